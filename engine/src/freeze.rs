//! Freezing every thread of a process with ptrace, and letting it go.

use crate::error::{Error, Result};
use crate::procfs;
use ferry_parasite::{ptrace::wait_tid, Stop, Tracee};
use std::collections::HashSet;

/// A process whose threads are all stopped under our control.
pub struct Frozen {
    pid: i32,
    /// Main thread first.
    threads: Vec<Tracee>,
}

impl Frozen {
    /// Seize and interrupt every thread of `pid`, including threads created
    /// while we do it.
    pub fn freeze(pid: i32) -> Result<Frozen> {
        if !procfs::exists(pid) {
            return Err(Error::NoSuchProcess { pid });
        }
        let me = std::process::id() as i32;
        if pid == me {
            return Err(Error::Unsupported {
                pid,
                what: "checkpointing ferry itself".into(),
            });
        }
        let status = procfs::read(pid, "status")?;
        if procfs::status_field(&status, "Tgid").and_then(|t| t.parse().ok()) != Some(pid) {
            return Err(Error::Unsupported {
                pid,
                what: format!("{pid} is a thread, not a process: checkpointing a single thread"),
            });
        }
        let mut frozen = Frozen {
            pid,
            threads: Vec::new(),
        };
        let mut seen = HashSet::new();
        loop {
            let tids = procfs::tasks(pid).map_err(|_| Error::NoSuchProcess { pid })?;
            let new: Vec<i32> = tids.into_iter().filter(|t| !seen.contains(t)).collect();
            if new.is_empty() {
                break;
            }
            for tid in new {
                seen.insert(tid);
                let mut t = match Tracee::seize(tid) {
                    Ok(t) => t,
                    Err(ferry_parasite::Error::NoSuchThread { .. }) if tid != pid => continue,
                    Err(ferry_parasite::Error::AlreadyTraced { .. }) if traced_by_me(tid) => {
                        // A clone child auto-attached to us (PTRACE_O_TRACECLONE).
                        let mut t = Tracee::adopt(tid);
                        match t.wait_event_stop() {
                            Ok(()) => frozen.threads.push(t),
                            // It exited before its first stop: nothing to freeze.
                            Err(ferry_parasite::Error::ThreadGone { .. }) => t.forget(),
                            Err(e) => return Err(e.into()),
                        }
                        continue;
                    }
                    Err(ferry_parasite::Error::NoSuchThread { .. }) => {
                        return Err(Error::NoSuchProcess { pid })
                    }
                    Err(e) => return Err(e.into()),
                };
                match t.interrupt() {
                    Ok(()) => frozen.threads.push(t),
                    Err(ferry_parasite::Error::ThreadGone { .. }) if tid != pid => t.forget(),
                    Err(e) => return Err(e.into()),
                }
            }
        }
        frozen.threads.sort_by_key(|t| (t.tid() != pid, t.tid()));
        Ok(frozen)
    }

    /// The PID.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The frozen threads, main thread first.
    pub fn threads(&mut self) -> &mut [Tracee] {
        &mut self.threads
    }

    /// Let the process run on, untouched.
    pub fn thaw(self) -> Result<()> {
        let mut first = None;
        // Resume the main thread last, so busy threads don't starve us.
        for t in self.threads.into_iter().rev() {
            if let Err(e) = t.detach() {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), |e| Err(e.into()))
    }

    /// Kill the process and wait until every thread is gone.
    pub fn kill(self) -> Result<()> {
        // SAFETY: plain kill(2) of the process we froze, by PID.
        let r = unsafe { libc::kill(self.pid, libc::SIGKILL) };
        if r != 0 {
            return Err(Error::io(
                format!("kill {}", self.pid),
                std::io::Error::last_os_error(),
            ));
        }
        // Reap non-leader threads first; the leader is reported last.
        for t in self.threads.into_iter().rev() {
            let tid = t.tid();
            t.forget();
            loop {
                match wait_tid(tid) {
                    Ok(Stop::Exited(_)) | Ok(Stop::Killed(_)) | Err(_) => break,
                    Ok(_) => {
                        // SAFETY: plain ptrace request with integer arguments.
                        unsafe { libc::ptrace(libc::PTRACE_CONT, tid, 0, 0) };
                    }
                }
            }
        }
        Ok(())
    }
}

fn traced_by_me(tid: i32) -> bool {
    let me = std::process::id().to_string();
    procfs::read(tid, "status")
        .ok()
        .and_then(|s| procfs::status_field(&s, "TracerPid"))
        .is_some_and(|t| t == me)
}
