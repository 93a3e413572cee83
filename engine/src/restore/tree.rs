//! Restoring a whole tree from an image directory: every process forked
//! from its parent's stub with its PID, sessions and groups as they were,
//! zombies that exit with their status, shared objects made once. The order
//! is described in [`crate::restore`].

use super::{build_task, memory, preflight, stub::Stub, RestoreOptions, RestoreSummary};
use crate::error::{Error, Result};
use crate::files::Opened;
use crate::shmem::ShmemHandles;
use ferry_protocol::image::read_tree_image;
use ferry_protocol::model::{ProcessImage, TreeImage, Vma};
use ferry_protocol::pages::{PageBatch, PageReader, PageSpace};
use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

/// Recreate the process tree saved in `dir` with its PIDs and TIDs, and
/// let it run.
pub fn restore(dir: &Path, opts: &RestoreOptions) -> Result<RestoreSummary> {
    let t0 = Instant::now();
    let tree = read_tree_image(dir)?;
    preflight(&tree)?;
    let mut shmem = ShmemHandles::create(&tree)?;
    let mut batch = PageBatch::default();
    for obj in &tree.shmem {
        let mut reader = PageReader::open_space(dir, PageSpace::Shmem(obj.id))?;
        while reader.read_batch_into(&mut batch)? {
            shmem.fill(obj.id, &batch)?;
        }
    }
    let mut b = Builder::new(&tree)?;
    b.fork_all()?;
    let opened = Opened::open_all(&tree, &shmem, &opts.stdio)?;
    let mut pages = 0;
    for (task, stub) in tree.tasks.iter().zip(b.stubs.iter_mut()) {
        pages += build_one(dir, task, stub, &shmem, &opened)?;
    }
    shmem.finish()?;
    let processes = b.stubs.len();
    for stub in b.stubs.drain(..).rev() {
        stub.resume()?;
    }
    Ok(RestoreSummary {
        pid: tree.root_pid(),
        processes,
        threads: tree.tasks.iter().map(|t| t.threads.len()).sum(),
        pages,
        duration: t0.elapsed(),
        stdio_log: opened.stdio_log.clone(),
    })
}

/// Memory, then everything else, of one process whose stub is an empty
/// shell; returns the pages written.
fn build_one(
    dir: &Path,
    task: &ProcessImage,
    stub: &mut Stub,
    shmem: &ShmemHandles,
    opened: &Opened,
) -> Result<u64> {
    let tramp = stub.tramp_range();
    {
        let pid = stub.pid;
        let mut inj = stub.injector()?;
        memory::place_special(&mut inj, pid, &task.vmas, tramp)?;
        memory::map_areas(&mut inj, &task.vmas, shmem)?;
    }
    let mut filler = memory::PageFiller::new(stub.pid, &task.vmas);
    let mut reader = PageReader::open_space(dir, PageSpace::Task(task.pid))?;
    let mut batch = PageBatch::default();
    let mut fresh_zero = Vec::new();
    while reader.read_batch_into(&mut batch)? {
        // Fresh anonymous memory is zero already.
        filler.write_batch(&batch, &mut fresh_zero)?;
        fresh_zero.clear();
    }
    build_task(stub, task, opened, None)?;
    Ok(filler.pages)
}

/// The stubs of a tree, one per live process in the image's order.
pub struct Builder<'a> {
    tree: &'a TreeImage,
    /// Stubs of the live processes, in `tree.tasks` order.
    pub stubs: Vec<Stub>,
    /// Process group each stub has now.
    pgid_now: HashMap<i32, i32>,
}

impl<'a> Builder<'a> {
    /// The root's stub, with a trampoline at an address that is free in
    /// every process of the tree.
    pub fn new(tree: &'a TreeImage) -> Result<Builder<'a>> {
        let root = tree
            .root()
            .ok_or_else(|| Error::parse("image", "no process"))?;
        let all: Vec<Vma> = tree.tasks.iter().flat_map(|t| t.vmas.clone()).collect();
        let stub = Stub::create(root.pid, &all)?;
        let mut pgid_now = HashMap::new();
        // SAFETY: getpgid(0) reads our own process group.
        pgid_now.insert(root.pid, unsafe { libc::getpgid(0) });
        Ok(Builder {
            tree,
            stubs: vec![stub],
            pgid_now,
        })
    }

    /// Fork every child and zombie from its parent's stub and give each
    /// its session and process group.
    pub fn fork_all(&mut self) -> Result<()> {
        let tree = self.tree;
        let root = &tree.tasks[0];
        // The root: its own session when it led its group (a shell job, a
        // daemon); else it stays in the restorer's group and session.
        if root.pgid == root.pid {
            self.own_session(0)?;
        }
        for t in &tree.tasks[1..] {
            let child = self.fork(t.ppid, t.pid)?;
            self.stubs.push(child);
            let i = self.stubs.len() - 1;
            self.own_ids(i, t.pid, t.pgid, t.sid)?;
        }
        // Groups whose leader exists only now.
        for (i, t) in tree.tasks.iter().enumerate() {
            self.join_group(i, t.pid, t.pgid)?;
        }
        self.make_zombies()
    }

    fn index(&self, pid: i32) -> Result<usize> {
        self.stubs
            .iter()
            .position(|s| s.pid == pid)
            .ok_or_else(|| Error::parse("image", format!("process {pid} has no stub yet")))
    }

    fn fork(&mut self, ppid: i32, pid: i32) -> Result<Stub> {
        let pi = self.index(ppid)?;
        let child = self.stubs[pi].fork_child(pid)?;
        let pg = self.pgid_now.get(&ppid).copied().unwrap_or(0);
        self.pgid_now.insert(pid, pg);
        Ok(child)
    }

    /// `setsid()` in stub `i`: its own session and group.
    fn own_session(&mut self, i: usize) -> Result<()> {
        let pid = self.stubs[i].pid;
        let mut inj = self.stubs[i].injector()?;
        inj.call("setsid", libc::SYS_setsid, &[])
            .map_err(|e| Error::Incompatible(format!("process {pid}: setsid failed: {e}")))?;
        self.pgid_now.insert(pid, pid);
        Ok(())
    }

    /// Right after the fork: a session leader makes its session, a group
    /// leader its group.
    fn own_ids(&mut self, i: usize, pid: i32, pgid: i32, sid: i32) -> Result<()> {
        if sid == pid {
            return self.own_session(i);
        }
        if pgid == pid {
            let mut inj = self.stubs[i].injector()?;
            inj.call("setpgid", libc::SYS_setpgid, &[0, 0])
                .map_err(|e| Error::Incompatible(format!("process {pid}: setpgid failed: {e}")))?;
            self.pgid_now.insert(pid, pid);
        }
        Ok(())
    }

    /// The group `pgid` names now: the root's group stands for itself even
    /// when it lay outside the tree.
    fn group_here(&self, pgid: i32) -> i32 {
        let root = &self.tree.tasks[0];
        if pgid == root.pgid {
            self.pgid_now.get(&root.pid).copied().unwrap_or(pgid)
        } else {
            pgid
        }
    }

    /// Join group `pgid` if stub `i` is not in it yet.
    fn join_group(&mut self, i: usize, pid: i32, pgid: i32) -> Result<()> {
        let want = self.group_here(pgid);
        if self.pgid_now.get(&pid) == Some(&want) {
            return Ok(());
        }
        let mut inj = self.stubs[i].injector()?;
        inj.call("setpgid", libc::SYS_setpgid, &[0, want as u64])
            .map_err(|e| {
                Error::Incompatible(format!(
                    "process {pid}: joining process group {want} failed: {e}"
                ))
            })?;
        self.pgid_now.insert(pid, want);
        Ok(())
    }

    /// Fork each zombie, give it its ids, and let it die with its status;
    /// then take the SIGCHLD it sent back from its parent.
    fn make_zombies(&mut self) -> Result<()> {
        let tree = self.tree;
        let mut parents = Vec::new();
        for z in &tree.zombies {
            let pi = self.index(z.ppid)?;
            {
                // Whatever the restorer's SIGCHLD disposition, the child
                // must stay a zombie: the image's dispositions come later.
                let mut inj = self.stubs[pi].injector()?;
                set_default_action(&mut inj, libc::SIGCHLD)?;
            }
            let mut stub = self.fork(z.ppid, z.pid)?;
            let mut probe = ZombieStub {
                stub: &mut stub,
                pid: z.pid,
            };
            probe.ids(z.pgid, z.sid, self.group_here(z.pgid))?;
            let sig = z.wait_status & 0x7f;
            let tramp = stub.tramp;
            let mut regs = stub
                .main
                .as_ref()
                .ok_or_else(|| Error::Incompatible("zombie stub lost its thread".into()))?
                .regs()?;
            regs.rip = tramp;
            regs.orig_rax = u64::MAX;
            if sig == 0 {
                regs.rax = libc::SYS_exit_group as u64;
                regs.rdi = ((z.wait_status >> 8) & 0xff) as u64;
            } else {
                {
                    let mut inj = stub.injector()?;
                    set_default_action(&mut inj, sig)?;
                    inj.tracee().set_sigmask(0)?;
                }
                regs.rax = libc::SYS_pause as u64;
            }
            stub.release_at(&regs)?;
            if sig != 0 {
                // SAFETY: kill(2) of the process we just made, by PID.
                if unsafe { libc::kill(z.pid, sig) } != 0 {
                    return Err(Error::io(
                        format!("killing zombie-to-be {} with signal {sig}", z.pid),
                        std::io::Error::last_os_error(),
                    ));
                }
            }
            wait_zombie(z.pid)?;
            parents.push(pi);
        }
        parents.sort_unstable();
        parents.dedup();
        for pi in parents {
            let mut inj = self.stubs[pi].injector()?;
            take_sigchld(&mut inj)?;
        }
        Ok(())
    }
}

/// A freshly forked stub that is to become a zombie.
struct ZombieStub<'s> {
    stub: &'s mut Stub,
    pid: i32,
}

impl ZombieStub<'_> {
    fn ids(&mut self, pgid: i32, sid: i32, group_here: i32) -> Result<()> {
        let pid = self.pid;
        let mut inj = self.stub.injector()?;
        if sid == pid {
            inj.call("setsid", libc::SYS_setsid, &[])?;
        } else if pgid == pid {
            inj.call("setpgid", libc::SYS_setpgid, &[0, 0])?;
        } else {
            // The group may be gone or in another session: best effort.
            let _ = inj.call("setpgid", libc::SYS_setpgid, &[0, group_here as u64]);
        }
        Ok(())
    }
}

/// `rt_sigaction(sig, SIG_DFL)` in the stub driven by `inj`.
fn set_default_action(inj: &mut ferry_parasite::remote::Injector, sig: i32) -> Result<()> {
    let act = [0u8; 32];
    let p = inj.put(512, &act)?;
    inj.call(
        "rt_sigaction(SIG_DFL)",
        libc::SYS_rt_sigaction,
        &[sig as u64, p, 0, 8],
    )?;
    Ok(())
}

/// Take every pending SIGCHLD of the stub driven by `inj` (its image's
/// pending signals are queued again later).
fn take_sigchld(inj: &mut ferry_parasite::remote::Injector) -> Result<()> {
    let set = (1u64 << (libc::SIGCHLD - 1)).to_le_bytes();
    let zero = [0u8; 16];
    let set_p = inj.put(512, &set)?;
    let ts_p = inj.put(576, &zero)?;
    for _ in 0..64 {
        let (r, _) = inj.call_raw(libc::SYS_rt_sigtimedwait, &[set_p, 0, ts_p, 8])?;
        if r < 0 {
            break;
        }
    }
    Ok(())
}

/// Wait until `pid` is a zombie.
fn wait_zombie(pid: i32) -> Result<()> {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(5) {
        if crate::procfs::stat(pid).is_ok_and(|s| s.state() == 'Z') {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Err(Error::Incompatible(format!(
        "process {pid} did not become a zombie"
    )))
}
