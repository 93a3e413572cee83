//! Freezing a whole process tree: the root and every descendant.
//!
//! The tree is walked from the root down, each process frozen (every
//! thread in a ptrace stop) *before* its children are read from
//! `/proc/PID/task/TID/children`: a frozen process cannot fork, so no child
//! is missed. Children that already exited but were not reaped (zombies)
//! are recorded, not frozen. Anything the tree cannot be restored with is
//! refused here, before any state is read, and everything frozen so far is
//! let go.

use crate::error::{Error, Result};
use crate::freeze::Frozen;
use crate::procfs;
use crate::shmem::ShmemCollector;
use ferry_protocol::model::{TaskIdentity, TaskLayout, TreeLayout, Zombie};
use std::collections::VecDeque;

/// `kcmp` types for the resources a clone may share.
const KCMP_VM: i64 = 1;
const KCMP_FILES: i64 = 2;
const KCMP_FS: i64 = 3;
const KCMP_SIGHAND: i64 = 4;

/// What a checkpoint or migration takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The process and all its descendants.
    Tree,
    /// The process alone (lazy migration): its children stay where they
    /// are.
    Process,
}

/// A frozen tree: live processes (parents before children) and zombies.
pub struct FrozenTree {
    /// Live processes, root first, each after its parent.
    pub tasks: Vec<(TaskIdentity, Frozen)>,
    pub zombies: Vec<Zombie>,
    /// Sockets a checkpoint put into repair mode: they leave it when the
    /// tree is thawed (or this is dropped), and stay in it when the tree
    /// is killed.
    pub repair: crate::files::socket::RepairSet,
}

impl FrozenTree {
    /// Freeze `root` and all its descendants. On error every process frozen
    /// so far is resumed untouched.
    pub fn freeze(root: i32) -> Result<FrozenTree> {
        Self::freeze_scope(root, Scope::Tree)
    }

    /// Freeze `root` and, with [`Scope::Tree`], all its descendants.
    pub fn freeze_scope(root: i32, scope: Scope) -> Result<FrozenTree> {
        let mut tree = FrozenTree {
            tasks: Vec::new(),
            zombies: Vec::new(),
            repair: Default::default(),
        };
        let walked = match scope {
            Scope::Tree => tree.walk(root),
            Scope::Process => Frozen::freeze(root).and_then(|f| {
                tree.tasks.push((identity(root)?, f));
                Ok(())
            }),
        };
        match walked {
            Ok(()) => Ok(tree),
            Err(e) => {
                if let Err(te) = tree.thaw() {
                    tracing::error!("resuming the tree of {root} after a failed freeze: {te}");
                }
                Err(e)
            }
        }
    }

    fn walk(&mut self, root: i32) -> Result<()> {
        let mut queue = VecDeque::from([root]);
        while let Some(pid) = queue.pop_front() {
            let frozen = match Frozen::freeze(pid) {
                Ok(f) => f,
                // Exited before its turn: not part of the tree any more.
                Err(Error::NoSuchProcess { .. }) if pid != root => continue,
                Err(e) => return Err(e),
            };
            let id = identity(pid)?;
            self.tasks.push((id, frozen));
            for child in children(pid)? {
                match zombie(pid, child) {
                    Ok(Some(z)) => self.zombies.push(z),
                    Ok(None) => queue.push_back(child),
                    Err(_) if !procfs::exists(child) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        self.check()
    }

    /// Refuse what a restore cannot give back: resources shared between
    /// processes (not threads) by `clone` flags, and sessions a child
    /// cannot get again (neither its parent's nor its own).
    fn check(&self) -> Result<()> {
        for (i, (a, _)) in self.tasks.iter().enumerate() {
            for (b, _) in &self.tasks[i + 1..] {
                for (ty, what) in [
                    (KCMP_VM, "its address space (vfork or CLONE_VM)"),
                    (KCMP_FILES, "its fd table (CLONE_FILES)"),
                    (KCMP_FS, "its cwd/root/umask (CLONE_FS)"),
                    (KCMP_SIGHAND, "its signal handlers (CLONE_SIGHAND)"),
                ] {
                    if kcmp(a.pid, b.pid, ty).map_err(|e| {
                        Error::io(format!("kcmp of processes {} and {}", a.pid, b.pid), e)
                    })? {
                        return Err(Error::Unsupported {
                            pid: b.pid,
                            what: format!("a process that shares {what} with process {}", a.pid),
                        });
                    }
                }
            }
        }
        let ids = self
            .tasks
            .iter()
            .map(|(t, _)| (t.pid, t.ppid, t.sid))
            .chain(self.zombies.iter().map(|z| (z.pid, z.ppid, z.sid)));
        for (pid, ppid, sid) in ids.skip(1) {
            let parent_sid = self
                .tasks
                .iter()
                .find(|(t, _)| t.pid == ppid)
                .map(|(t, _)| t.sid);
            if sid != pid && Some(sid) != parent_sid {
                return Err(Error::Unsupported {
                    pid,
                    what: format!(
                        "a process in session {sid}, which is neither its own nor its parent's"
                    ),
                });
            }
        }
        Ok(())
    }

    /// The root's PID.
    pub fn root(&self) -> i32 {
        self.tasks.first().map_or(0, |(t, _)| t.pid)
    }

    /// Let every process run on, untouched (children first, the root last).
    pub fn thaw(self) -> Result<()> {
        self.repair.leave();
        let mut first = None;
        for (_, f) in self.tasks.into_iter().rev() {
            if let Err(e) = f.thaw() {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Kill every process of the tree (children first) and wait until each
    /// is gone.
    pub fn kill(self) -> Result<()> {
        let mut first = None;
        for (_, f) in self.tasks.into_iter().rev() {
            if let Err(e) = f.kill() {
                first.get_or_insert(e);
            }
        }
        self.repair.close_in_repair();
        first.map_or(Ok(()), Err)
    }
}

/// `child` of `parent` as a zombie, if it is one.
fn zombie(parent: i32, child: i32) -> Result<Option<Zombie>> {
    let st = procfs::stat(child)?;
    if st.state() != 'Z' && st.state() != 'X' {
        return Ok(None);
    }
    Ok(Some(Zombie {
        pid: child,
        ppid: parent,
        pgid: st.field(5)? as i32,
        sid: st.field(6)? as i32,
        wait_status: st.field(52)? as i32,
    }))
}

/// The layout of the running tree of `root`, read without freezing it (a
/// snapshot, which pre-copy sends with each pass): who is who, every
/// process's areas, and the shared memory objects, with ids given in the
/// order a checkpoint gives them (each process's areas, then its fds). The
/// collector reads the objects' contents.
pub fn live_layout(root: i32, scope: Scope) -> Result<(TreeLayout, ShmemCollector)> {
    let (ids, zombies) = match scope {
        Scope::Tree => live_members(root)?,
        Scope::Process => (vec![identity(root)?], Vec::new()),
    };
    let mut shmem = ShmemCollector::new();
    let mut tasks = Vec::with_capacity(ids.len());
    for id in ids {
        let read = super::memory::collect_vmas_with(id.pid, &mut shmem)
            .and_then(|vmas| shmem_fds(id.pid, &mut shmem).map(|()| vmas));
        let vmas = match read {
            Ok(v) => v,
            Err(_) if id.pid != root && !procfs::exists(id.pid) => continue,
            Err(e) => return Err(e),
        };
        tasks.push(TaskLayout { id, vmas });
    }
    let layout = TreeLayout {
        tasks,
        zombies,
        shmem: shmem.objects(),
    };
    Ok((layout, shmem))
}

/// The processes (root first, parents before children) and zombies of the
/// running tree of `root`.
pub fn live_members(root: i32) -> Result<(Vec<TaskIdentity>, Vec<Zombie>)> {
    let mut tasks = Vec::new();
    let mut zombies = Vec::new();
    let mut queue = VecDeque::from([root]);
    while let Some(pid) = queue.pop_front() {
        // A child may exit while the tree is read: it is not part of it.
        let (id, kids) = match identity(pid).and_then(|id| Ok((id, children(pid)?))) {
            Ok(x) => x,
            Err(_) if pid != root && !procfs::exists(pid) => continue,
            Err(e) => return Err(e),
        };
        tasks.push(id);
        for child in kids {
            match zombie(pid, child) {
                Ok(Some(z)) => zombies.push(z),
                Ok(None) => queue.push_back(child),
                Err(_) if !procfs::exists(child) => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok((tasks, zombies))
}

/// Give ids to the shared memory objects that fds of `pid` hold.
fn shmem_fds(pid: i32, shmem: &mut ShmemCollector) -> Result<()> {
    for fd in crate::files::list_fds(pid)? {
        let Ok(link) = procfs::link(pid, &format!("fd/{fd}")) else {
            continue;
        };
        if !(link.starts_with("/memfd:") || link.starts_with("/dev/shm/")) {
            continue;
        }
        let magic = format!("/proc/{pid}/fd/{fd}");
        let Ok(md) = std::fs::metadata(&magic) else {
            continue;
        };
        shmem.fd_object(pid, fd, &link, &md)?;
    }
    Ok(())
}

/// Every PID and TID of these processes and zombies, the first's PID first.
pub fn live_ids(tasks: &[TaskIdentity], zombies: &[Zombie]) -> Result<Vec<i32>> {
    let mut ids = Vec::new();
    for t in tasks {
        ids.push(t.pid);
        // A child that exited meanwhile has no threads left to name.
        let mut tids = procfs::tasks(t.pid).unwrap_or_default();
        tids.retain(|&tid| tid != t.pid);
        ids.extend(tids);
    }
    ids.extend(zombies.iter().map(|z| z.pid));
    Ok(ids)
}

/// PID, parent, process group and session of `pid` (from its stat).
pub fn identity(pid: i32) -> Result<TaskIdentity> {
    let st = procfs::stat(pid)?;
    Ok(TaskIdentity {
        pid,
        ppid: st.field(4)? as i32,
        pgid: st.field(5)? as i32,
        sid: st.field(6)? as i32,
    })
}

/// The children of every thread of `pid`.
pub fn children(pid: i32) -> Result<Vec<i32>> {
    let mut out = Vec::new();
    for tid in procfs::tasks(pid)? {
        let path = format!("/proc/{pid}/task/{tid}/children");
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            // A thread that exited meanwhile has no children.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
            Err(e) => return Err(Error::io(format!("reading {path}"), e)),
        };
        for w in text.split_whitespace() {
            let c = w
                .parse::<i32>()
                .map_err(|_| Error::parse(path.clone(), w.to_string()))?;
            if !out.contains(&c) {
                out.push(c);
            }
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// `kcmp(a, b, ty, 0, 0) == 0`: the two processes share that resource.
fn kcmp(a: i32, b: i32, ty: i64) -> std::io::Result<bool> {
    // SAFETY: integer arguments only; kcmp reads no memory of ours.
    let r = unsafe { libc::syscall(libc::SYS_kcmp, a, b, ty, 0, 0) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r == 0)
    }
}
