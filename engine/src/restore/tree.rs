//! Building a whole tree: every process forked from its parent's stub
//! with its PID, sessions and groups as they were, zombies that exit with
//! their status, shared objects made once. The order is described in
//! [`crate::restore`]. [`TreeRestorer`] does it from a [`TreeLayout`] (the
//! first pre-copy pass's, or an image's) and takes pages per page space as
//! they come; [`restore`] drives it from an image directory.

use super::{
    build_task, check_files, check_host, check_ids_free, memory, preflight, stub::Stub,
    RestoreOptions, RestoreSummary,
};
use crate::error::{Error, Result};
use crate::files::{Opened, StdioPolicy};
use crate::shmem::ShmemHandles;
use ferry_protocol::image::read_tree_image;
use ferry_protocol::model::{HostInfo, TaskIdentity, TreeImage, TreeLayout, Vma, Zombie};
use ferry_protocol::pages::{PageBatch, PageReader, PageSpace};
use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

/// Recreate the process tree saved in `dir` with its PIDs and TIDs, and
/// let it run.
pub fn restore(dir: &Path, opts: &RestoreOptions) -> Result<RestoreSummary> {
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    super::trusted::check_image_dir(dir, uid)?;
    let tree = read_tree_image(dir)?;
    preflight(&tree)?;
    let mut r = TreeRestorer::begin(&tree.layout(), &tree.host)?;
    r.set_stdio(opts.stdio.clone());
    let mut batch = PageBatch::default();
    let spaces = tree
        .shmem
        .iter()
        .map(|o| PageSpace::Shmem(o.id))
        .chain(tree.tasks.iter().map(|t| PageSpace::Task(t.pid)));
    for space in spaces {
        let mut reader = PageReader::open_space(dir, space)?;
        while reader.read_batch_into(&mut batch)? {
            r.write_batch(space, &batch)?;
        }
    }
    r.finish(&tree)?.resume()
}

/// A tree being built: every stub runs with its PID, forked from its
/// parent's, with its areas mapped (writable for now) and its shared
/// memory objects made; pages are written as they arrive, per page space;
/// [`TreeRestorer::finish`] applies the rest of the state. Dropping it
/// kills the stubs and removes what was made.
///
/// ptrace binds the stubs to the OS thread that created them: call every
/// method on that thread.
pub struct TreeRestorer {
    layout: TreeLayout,
    b: Builder,
    /// Per process.
    fillers: HashMap<i32, memory::PageFiller>,
    shmem: ShmemHandles,
    /// A pass after the first: zero pages must drop earlier contents.
    later_pass: bool,
    t0: Instant,
    stdio: StdioPolicy,
}

impl TreeRestorer {
    /// Check the host, that every PID is free and the mapped files are
    /// the same, make the shared memory objects, fork the tree's stubs
    /// (sessions, groups, zombies), move each one's vDSO areas to their
    /// addresses and map its areas.
    pub fn begin(layout: &TreeLayout, host: &HostInfo) -> Result<TreeRestorer> {
        let t0 = Instant::now();
        check_host(host)?;
        let ids: Vec<i32> = layout
            .tasks
            .iter()
            .map(|t| t.id.pid)
            .chain(layout.zombies.iter().map(|z| z.pid))
            .collect();
        check_ids_free(&ids)?;
        for t in &layout.tasks {
            check_files(&t.vmas)?;
        }
        let shmem = ShmemHandles::create_objects(&layout.shmem)?;
        let mut b = Builder::new(layout)?;
        b.fork_all(layout)?;
        let mut fillers = HashMap::new();
        for (t, stub) in layout.tasks.iter().zip(b.stubs.iter_mut()) {
            let tramp = stub.tramp_range();
            let pid = stub.pid;
            let mut inj = stub.injector()?;
            memory::place_special(&mut inj, pid, &t.vmas, tramp)?;
            memory::map_areas(&mut inj, &t.vmas, &shmem)?;
            fillers.insert(pid, memory::PageFiller::new(pid, &t.vmas));
        }
        Ok(TreeRestorer {
            layout: layout.clone(),
            b,
            fillers,
            shmem,
            later_pass: false,
            t0,
            stdio: StdioPolicy::in_dir(Path::new("/var/log/ferry"), layout.root_pid()),
        })
    }

    /// Where stdio that reached outside the tree goes (default:
    /// `/var/log/ferry/ferry-PID.log`).
    pub fn set_stdio(&mut self, stdio: StdioPolicy) {
        self.stdio = stdio;
    }

    /// The root's PID.
    pub fn pid(&self) -> i32 {
        self.layout.root_pid()
    }

    /// The layout changed between passes: processes and zombies that came
    /// are made (a new process is forked from its parent's stub and mapped
    /// afresh: all its pages come in this pass), those gone are removed,
    /// new shared memory objects are made, and each process's areas that
    /// differ are remapped (their pages must be sent again in full). A
    /// process keeps its PID, parent, group and session; the root stays.
    pub fn relayout(&mut self, layout: &TreeLayout) -> Result<()> {
        let old = std::mem::replace(&mut self.layout, layout.clone());
        let r = self.apply_layout(&old, layout);
        if r.is_err() {
            self.layout = old;
        }
        r
    }

    fn apply_layout(&mut self, old: &TreeLayout, new: &TreeLayout) -> Result<()> {
        let changed = |why: String| {
            Error::Incompatible(format!(
                "the process tree changed during pre-copy in a way that cannot be followed: \
                 {why}; try the migration again"
            ))
        };
        if new.root_pid() != old.root_pid() {
            return Err(changed("another root".into()));
        }
        for t in &new.tasks {
            if let Some(o) = old.task(t.id.pid) {
                if o.id != t.id {
                    return Err(changed(format!(
                        "process {} changed its parent, group or session",
                        t.id.pid
                    )));
                }
            }
        }
        for o in &old.shmem {
            if let Some(n) = new.shmem.iter().find(|n| n.id == o.id) {
                if n != o {
                    return Err(changed(format!("shared memory object {} changed", o.id)));
                }
            }
        }
        let fresh: Vec<_> = new
            .shmem
            .iter()
            .filter(|n| !old.shmem.iter().any(|o| o.id == n.id))
            .cloned()
            .collect();
        self.shmem.add_objects(&fresh)?;
        // Gone: zombies reaped, processes exited (children first).
        for z in &old.zombies {
            if !new.zombies.iter().any(|n| n.pid == z.pid) && self.b.index(z.ppid).is_ok() {
                self.b.reap_zombie(z)?;
            }
        }
        for t in old.tasks.iter().rev() {
            if new.task(t.id.pid).is_none() {
                self.b.remove(t.id.pid)?;
                self.fillers.remove(&t.id.pid);
            }
        }
        for t in &new.tasks {
            let pid = t.id.pid;
            let Some(o) = old.task(pid) else {
                check_ids_free(&[pid])?;
                check_files(&t.vmas)?;
                let parent = old
                    .task(t.id.ppid)
                    .or_else(|| new.task(t.id.ppid))
                    .map(|p| p.vmas.clone())
                    .unwrap_or_default();
                let i = self.b.add(t.id)?;
                let stub = &mut self.b.stubs[i];
                let tramp = stub.tramp_range();
                let mut inj = stub.injector()?;
                // A copy of the parent: drop all of it, map its own.
                memory::unmap_gone(&mut inj, &parent, &[])?;
                memory::place_special(&mut inj, pid, &t.vmas, tramp)?;
                memory::map_areas(&mut inj, &t.vmas, &self.shmem)?;
                self.fillers
                    .insert(pid, memory::PageFiller::new(pid, &t.vmas));
                continue;
            };
            if t.vmas == o.vmas {
                continue;
            }
            check_files(&t.vmas)?;
            let i = self.b.index(pid)?;
            {
                let mut inj = self.b.stubs[i].injector()?;
                memory::relayout_with(&mut inj, &o.vmas, &t.vmas, &self.shmem)?;
            }
            if let Some(f) = self.fillers.get_mut(&pid) {
                f.set_layout(&t.vmas);
            }
        }
        let born: Vec<Zombie> = new
            .zombies
            .iter()
            .filter(|z| !old.zombies.iter().any(|o| o.pid == z.pid))
            .copied()
            .collect();
        self.b.make_zombies(&born)?;
        // Keep the stubs in the layout's order.
        let order: Vec<i32> = new.tasks.iter().map(|t| t.id.pid).collect();
        self.b
            .stubs
            .sort_by_key(|s| order.iter().position(|&p| p == s.pid).unwrap_or(usize::MAX));
        self.later_pass = true;
        Ok(())
    }

    /// Write one batch of pages of `space`: a process's (every page in a
    /// private area; after [`TreeRestorer::relayout`], zero pages also drop
    /// what an earlier pass wrote there), or a shared memory object's.
    pub fn write_batch(&mut self, space: PageSpace, batch: &PageBatch) -> Result<()> {
        let pid = match space {
            PageSpace::Shmem(id) => return self.shmem.fill(id, batch),
            PageSpace::Task(pid) => pid,
        };
        let filler = self
            .fillers
            .get_mut(&pid)
            .ok_or_else(|| Error::Incompatible(format!("process {pid} is not in the tree")))?;
        let mut anon_zero = Vec::new();
        filler.write_batch(batch, &mut anon_zero)?;
        if self.later_pass && !anon_zero.is_empty() {
            let i = self.b.index(pid)?;
            let mut inj = self.b.stubs[i].injector()?;
            for (addr, len) in anon_zero {
                inj.call(
                    "madvise(MADV_DONTNEED)",
                    libc::SYS_madvise,
                    &[addr, len, libc::MADV_DONTNEED as u64],
                )?;
            }
        }
        Ok(())
    }

    /// Apply everything else from `img` (whose layout must be the one
    /// built) but keep every thread stopped: the tree is ready and runs only
    /// on [`Ready::resume`]. If `Ready` is dropped instead, or this program
    /// dies first, the tree is killed (ptrace's exit-kill), so a migration
    /// that is not confirmed leaves nothing running here.
    pub fn finish(self, img: &TreeImage) -> Result<Ready> {
        self.finish_with(img, None)
    }

    /// [`TreeRestorer::finish`] for a lazy switchover of a single process:
    /// the pages of `owed` (spans `(addr, pages)` inside private anonymous
    /// areas) are dropped and registered with a userfaultfd instead;
    /// [`Ready::take_uffd`] hands it over, to be served before the process
    /// resumes.
    pub fn finish_lazy(self, img: &TreeImage, owed: &[(u64, u64)]) -> Result<Ready> {
        self.finish_with(img, Some(owed))
    }

    fn finish_with(mut self, img: &TreeImage, owed: Option<&[(u64, u64)]>) -> Result<Ready> {
        if img.layout() != self.layout {
            return Err(Error::Incompatible(
                "the image's processes or memory layout differ from the ones being built".into(),
            ));
        }
        if let Some(_owed) = owed {
            if img.tasks.len() != 1 || !img.zombies.is_empty() || !img.shmem.is_empty() {
                return Err(Error::Incompatible(
                    "lazy pages move a single process without shared memory".into(),
                ));
            }
            crate::lazy::uffd::kernel_support().map_err(|what| Error::Unsupported {
                pid: img.root_pid(),
                what: format!("lazy pages: {what}"),
            })?;
        }
        let opened = Opened::open_all(img, &self.shmem, &self.stdio)?;
        // Before the root's stub has fds of its own: see files::epoll.
        if let Some(root) = self.b.stubs.first_mut() {
            crate::files::epoll::register_all(&mut root.injector()?, img, &opened)?;
        }
        let mut uffd = None;
        for (i, (task, stub)) in img.tasks.iter().zip(self.b.stubs.iter_mut()).enumerate() {
            let u = build_task(stub, task, &opened, owed, i == 0)?;
            uffd = uffd.or(u);
        }
        self.shmem.finish()?;
        let pages = self.fillers.values().map(|f| f.pages).sum();
        Ok(Ready {
            summary: RestoreSummary {
                pid: img.root_pid(),
                processes: img.tasks.len(),
                threads: img.tasks.iter().map(|t| t.threads.len()).sum(),
                pages,
                duration: self.t0.elapsed(),
                stdio_log: opened.stdio_log.clone(),
            },
            stubs: std::mem::take(&mut self.b.stubs),
            shmem: std::mem::take(&mut self.shmem),
            uffd,
        })
    }
}

/// A restored tree with every thread still stopped under our control.
pub struct Ready {
    stubs: Vec<Stub>,
    shmem: ShmemHandles,
    /// What the restore did (duration up to now).
    pub summary: RestoreSummary,
    /// For a lazy restore: the armed userfaultfd of the process.
    uffd: Option<userfaultfd::Uffd>,
}

impl Ready {
    /// The root's PID.
    pub fn pid(&self) -> i32 {
        self.summary.pid
    }

    /// The userfaultfd of a lazy restore (once): whoever holds it must
    /// serve the process's faults from before [`Ready::resume`] on.
    pub fn take_uffd(&mut self) -> Option<userfaultfd::Uffd> {
        self.uffd.take()
    }

    /// Let every process run (children first, the root last); they are no
    /// longer traced.
    pub fn resume(mut self) -> Result<RestoreSummary> {
        let summary = self.summary.clone();
        self.shmem.commit();
        let mut first = None;
        for stub in self.stubs.drain(..).rev() {
            if let Err(e) = stub.resume() {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(summary), Err)
    }
}

/// The stubs of a tree, one per live process, parents before children.
pub struct Builder {
    /// The root's identity at checkpoint (its group and session may lie
    /// outside the tree).
    root: TaskIdentity,
    /// Stubs of the live processes.
    pub stubs: Vec<Stub>,
    /// Process group each stub has now.
    pgid_now: HashMap<i32, i32>,
}

impl Builder {
    /// The root's stub, with a trampoline at an address that is free in
    /// every process of the tree.
    pub fn new(tree: &TreeLayout) -> Result<Builder> {
        let root = tree
            .tasks
            .first()
            .ok_or_else(|| Error::parse("image", "no process"))?
            .id;
        let all: Vec<Vma> = tree.tasks.iter().flat_map(|t| t.vmas.clone()).collect();
        let stub = Stub::create(root.pid, &all)?;
        let mut pgid_now = HashMap::new();
        // SAFETY: getpgid(0) reads our own process group.
        pgid_now.insert(root.pid, unsafe { libc::getpgid(0) });
        Ok(Builder {
            root,
            stubs: vec![stub],
            pgid_now,
        })
    }

    /// Fork every child and zombie of `tree` from its parent's stub and give
    /// each its session and process group.
    pub fn fork_all(&mut self, tree: &TreeLayout) -> Result<()> {
        let root = self.root;
        // The root: its own session when it led its group (a shell job, a
        // daemon); else it stays in the restorer's group and session.
        if root.pgid == root.pid {
            self.own_session(0)?;
        }
        for t in tree.tasks[1..].iter().map(|t| t.id) {
            let child = self.fork(t.ppid, t.pid)?;
            self.stubs.push(child);
            let i = self.stubs.len() - 1;
            self.own_ids(i, t.pid, t.pgid, t.sid)?;
        }
        // Groups whose leader exists only now.
        for (i, t) in tree.tasks.iter().map(|t| t.id).enumerate() {
            self.join_group(i, t.pid, t.pgid)?;
        }
        self.make_zombies(&tree.zombies)
    }

    /// Fork one more process (appeared during pre-copy) from its parent's
    /// stub, with its session and group. Its stub holds a copy of the
    /// parent's address space: the caller maps the child's own.
    pub fn add(&mut self, id: TaskIdentity) -> Result<usize> {
        let child = self.fork(id.ppid, id.pid)?;
        self.stubs.push(child);
        let i = self.stubs.len() - 1;
        self.own_ids(i, id.pid, id.pgid, id.sid)?;
        self.join_group(i, id.pid, id.pgid)?;
        Ok(i)
    }

    /// Kill the stub of a process that is gone (exited during pre-copy).
    pub fn remove(&mut self, pid: i32) -> Result<()> {
        let i = self.index(pid)?;
        drop(self.stubs.remove(i));
        self.pgid_now.remove(&pid);
        Ok(())
    }

    /// Reap zombie `z` (its parent reaped it during pre-copy).
    pub fn reap_zombie(&mut self, z: &Zombie) -> Result<()> {
        let pi = self.index(z.ppid)?;
        let mut inj = self.stubs[pi].injector()?;
        inj.call(
            "wait4(zombie)",
            libc::SYS_wait4,
            &[z.pid as u64, 0, (libc::WNOHANG | libc::__WALL) as u64, 0],
        )?;
        Ok(())
    }

    /// The stub of `pid`.
    pub fn index(&self, pid: i32) -> Result<usize> {
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
        let root = self.root;
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
    pub fn make_zombies(&mut self, zombies: &[Zombie]) -> Result<()> {
        let mut parents = Vec::new();
        for z in zombies {
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
