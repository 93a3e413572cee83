//! Restore: rebuild a process tree from an image by remote control of
//! stubs.
//!
//! ```text
//!  preflight (host, PIDs/TIDs free, files unchanged)
//!  shmem::ShmemHandles::create/fill   shared memory objects, once each
//!  stub::Stub::create(root)           clone3(set_tid=PID), trampoline, tear down
//!  tree::Builder::fork_all            every child forked from its parent's
//!                                     empty stub (clone3 set_tid), sessions
//!                                     and groups set, zombies made to exit
//!  files::Opened::open_all            every open file once, in the agent
//!  per process (build_task):
//!    memory::place_special            vvar/vdso to the recorded addresses
//!    memory::map_areas/fill/protect   private areas, shared objects mapped
//!    mm::apply                        PR_SET_MM_MAP + exe
//!    files::install, misc::apply
//!    threads::create/setup            clone3(set_tid=TID) per thread
//!    signals, credentials, trampoline removed, registers
//!  shmem finish (seals), then every process resumes
//! ```
//!
//! The tree's order is the kernel's: a session is made (`setsid`) by its
//! leader before it forks the rest of the session, a process group is
//! joined (`setpgid`) once its leader exists, parents come before their
//! children (a child can only be forked by its parent), shared objects
//! before the processes that use them, and zombies last (they exit as soon
//! as they exist, with their recorded status, and their parent's SIGCHLD is
//! taken back unless it was pending at the checkpoint).
//!
//! [`Restorer`] builds a single process as its pages arrive (pre-copy
//! migration); [`restore`] builds a whole tree from an image directory.

pub mod memory;
pub mod misc;
pub mod mm;
pub mod stub;
pub mod threads;
pub mod tree;

use crate::error::{Error, Result};
use crate::files::{Opened, StdioPolicy};
use crate::shmem::ShmemHandles;
use ferry_parasite::Tracee;
use ferry_protocol::model::{HostInfo, ProcessImage, TreeImage, Vma, VmaKind};
use ferry_protocol::pages::PageBatch;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
pub use tree::restore;

/// Top of the user address space on x86-64.
pub const TASK_SIZE: u64 = 0x0000_7fff_ffff_f000;

/// How to restore.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// Where stdio that reached outside the tree goes.
    pub stdio: StdioPolicy,
}

/// What a restore did.
#[derive(Debug, Clone)]
pub struct RestoreSummary {
    /// The root's PID.
    pub pid: i32,
    /// Live processes restored.
    pub processes: usize,
    /// Threads of all processes.
    pub threads: usize,
    pub pages: u64,
    pub duration: Duration,
    /// The log file that took the place of stdio reaching outside the tree.
    pub stdio_log: Option<PathBuf>,
}

/// Refuse early, with the reason, what cannot work here: another kind of
/// host, a PID or TID in use, a mapped file changed, an executable missing.
pub fn preflight(img: &TreeImage) -> Result<()> {
    check_host(&img.host)?;
    check_ids_free(&img.all_ids())?;
    for t in &img.tasks {
        check_files(&t.vmas)?;
        check_executable(t)?;
    }
    Ok(())
}

/// The image's host must be compatible with this one.
pub fn check_host(host: &HostInfo) -> Result<()> {
    match crate::host::incompatibility(host, &crate::host::host_info()) {
        Some(why) => Err(Error::Incompatible(why)),
        None => Ok(()),
    }
}

/// Every PID and TID must be free here.
pub fn check_ids_free(ids: &[i32]) -> Result<()> {
    for &t in ids {
        if crate::procfs::exists(t) {
            return Err(Error::Incompatible(format!(
                "PID/TID {t} is already in use on this host"
            )));
        }
    }
    Ok(())
}

/// Every mapped file must exist, and privately mapped ones must be
/// unchanged (size and modification time) since the checkpoint.
pub fn check_files(vmas: &[Vma]) -> Result<()> {
    let mut checked = std::collections::HashSet::new();
    for v in vmas {
        let f = match &v.kind {
            VmaKind::File(f) | VmaKind::SharedFile(f) => f,
            _ => continue,
        };
        if !checked.insert(f.path.as_str()) {
            continue;
        }
        let meta = std::fs::metadata(&f.path)
            .map_err(|e| Error::Incompatible(format!("mapped file {} is missing: {e}", f.path)))?;
        let mtime = meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128;
        let private = matches!(v.kind, VmaKind::File(_));
        if private && (meta.size() != f.size || mtime != f.mtime_ns) {
            return Err(Error::Incompatible(format!(
                "mapped file {} changed since the checkpoint (size {} → {}, mtime changed: {})",
                f.path,
                f.size,
                meta.size(),
                mtime != f.mtime_ns
            )));
        }
    }
    Ok(())
}

fn check_executable(img: &ProcessImage) -> Result<()> {
    if !Path::new(&img.mm.exe_path).exists() {
        return Err(Error::Incompatible(format!(
            "executable {} of process {} is missing",
            img.mm.exe_path, img.pid
        )));
    }
    Ok(())
}

/// A single-process restore in progress (the pre-copy migration's): the
/// stub runs with the image's PID, its address space is mapped (writable
/// for now), and pages can be written into it as they arrive;
/// [`Restorer::complete`] applies the rest of the state and lets the
/// process run. Dropping it kills the stub.
///
/// ptrace binds the stub to the OS thread that created it: call every
/// method on that thread.
pub struct Restorer {
    stub: stub::Stub,
    vmas: Vec<Vma>,
    filler: memory::PageFiller,
    /// A pass after the first: zero pages must drop earlier contents.
    later_pass: bool,
    t0: Instant,
    stdio: StdioPolicy,
}

impl Restorer {
    /// Check the host and that `pid` and `tids` are free, create the stub
    /// with `pid`, move the vDSO areas to their addresses and map `vmas`.
    pub fn begin(pid: i32, tids: &[i32], host: &HostInfo, vmas: &[Vma]) -> Result<Restorer> {
        let t0 = Instant::now();
        check_host(host)?;
        let mut ids = vec![pid];
        ids.extend(tids.iter().filter(|&&t| t != pid));
        check_ids_free(&ids)?;
        check_files(vmas)?;
        let mut stub = stub::Stub::create(pid, vmas)?;
        let tramp = stub.tramp_range();
        {
            let stub_pid = stub.pid;
            let mut inj = stub.injector()?;
            memory::place_special(&mut inj, stub_pid, vmas, tramp)?;
            memory::map_areas(&mut inj, vmas, &ShmemHandles::default())?;
        }
        Ok(Restorer {
            filler: memory::PageFiller::new(stub.pid, vmas),
            stub,
            vmas: vmas.to_vec(),
            later_pass: false,
            t0,
            stdio: StdioPolicy::in_dir(Path::new("/var/log/ferry"), pid),
        })
    }

    /// Where stdio that reached outside the process goes (default:
    /// `/var/log/ferry/ferry-PID.log`).
    pub fn set_stdio(&mut self, stdio: StdioPolicy) {
        self.stdio = stdio;
    }

    /// The PID of the process being built.
    pub fn pid(&self) -> i32 {
        self.stub.pid
    }

    /// The address space changed between passes: remap what differs
    /// (those areas' pages must be sent again in full).
    pub fn relayout(&mut self, vmas: &[Vma]) -> Result<()> {
        check_files(vmas)?;
        {
            let mut inj = self.stub.injector()?;
            memory::relayout(&mut inj, &self.vmas, vmas)?;
        }
        self.vmas = vmas.to_vec();
        self.filler.set_layout(vmas);
        self.later_pass = true;
        Ok(())
    }

    /// Write one batch of pages; every page must lie in a private area.
    /// After [`Restorer::relayout`] (a later pass), zero pages also drop
    /// what an earlier pass wrote there.
    pub fn write_batch(&mut self, batch: &PageBatch) -> Result<()> {
        let mut anon_zero = Vec::new();
        self.filler.write_batch(batch, &mut anon_zero)?;
        if self.later_pass && !anon_zero.is_empty() {
            let mut inj = self.stub.injector()?;
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

    /// Apply everything else from `img` (a tree of this one process, whose
    /// memory layout must be the one given to [`Restorer::begin`]) and let
    /// the process run.
    pub fn complete(self, img: &TreeImage) -> Result<RestoreSummary> {
        let ready = self.finish(img)?;
        ready.resume()
    }

    /// Apply everything else from `img` but keep every thread stopped: the
    /// process is ready and runs only on [`Ready::resume`]. If `Ready` is
    /// dropped instead, or this program dies first, the process is killed
    /// (ptrace's exit-kill), so a migration that is not confirmed leaves
    /// nothing running here.
    pub fn finish(self, img: &TreeImage) -> Result<Ready> {
        self.finish_with(img, None)
    }

    /// [`Restorer::finish`] for a lazy switchover: the pages of `owed`
    /// (spans `(addr, pages)` inside private anonymous areas) are dropped
    /// and registered with a userfaultfd instead; [`Ready::take_uffd`] hands
    /// it over, to be served before the process resumes.
    pub fn finish_lazy(self, img: &TreeImage, owed: &[(u64, u64)]) -> Result<Ready> {
        self.finish_with(img, Some(owed))
    }

    fn finish_with(mut self, img: &TreeImage, owed: Option<&[(u64, u64)]>) -> Result<Ready> {
        let task = match (img.tasks.as_slice(), img.zombies.is_empty(), img.shmem.is_empty()) {
            ([t], true, true) => t,
            _ => {
                return Err(Error::Incompatible(
                    "this restore builds one process; the image holds a process tree or \
                     shared memory"
                        .into(),
                ))
            }
        };
        if task.pid != self.stub.pid || task.vmas != self.vmas {
            return Err(Error::Incompatible(
                "the image's PID or memory layout differs from the one being built".into(),
            ));
        }
        if owed.is_some() {
            crate::lazy::uffd::kernel_support().map_err(|what| Error::Unsupported {
                pid: task.pid,
                what: format!("lazy pages: {what}"),
            })?;
        }
        let opened = Opened::open_all(img, &ShmemHandles::default(), &self.stdio)?;
        let uffd = build_task(&mut self.stub, task, &opened, owed)?;
        Ok(Ready {
            summary: RestoreSummary {
                pid: task.pid,
                processes: 1,
                threads: task.threads.len(),
                pages: self.filler.pages,
                duration: self.t0.elapsed(),
                stdio_log: opened.stdio_log.clone(),
            },
            stub: self.stub,
            uffd,
        })
    }
}

/// A restored process with every thread still stopped under our control.
pub struct Ready {
    stub: stub::Stub,
    /// What the restore did (duration up to now).
    pub summary: RestoreSummary,
    /// For a lazy restore: the armed userfaultfd of the process.
    uffd: Option<userfaultfd::Uffd>,
}

impl Ready {
    /// The PID of the process.
    pub fn pid(&self) -> i32 {
        self.stub.pid
    }

    /// The userfaultfd of a lazy restore (once): whoever holds it must
    /// serve the process's faults from before [`Ready::resume`] on.
    pub fn take_uffd(&mut self) -> Option<userfaultfd::Uffd> {
        self.uffd.take()
    }

    /// Let the process run; it is no longer traced.
    pub fn resume(self) -> Result<RestoreSummary> {
        let summary = self.summary.clone();
        self.stub.resume()?;
        Ok(summary)
    }
}

/// Everything after the pages: protections, mm, fds, signals, threads,
/// credentials, registers. Threads stay stopped. With `owed` (lazy), those
/// pages are dropped and a userfaultfd is armed over them.
pub(crate) fn build_task(
    stub: &mut stub::Stub,
    img: &ProcessImage,
    opened: &Opened,
    owed: Option<&[(u64, u64)]>,
) -> Result<Option<userfaultfd::Uffd>> {
    let mut others = Vec::new();
    let r = apply_state(stub, img, opened, owed, &mut others);
    // Tracked by the stub in every case: killed with it on failure.
    stub.others.append(&mut others);
    let Some(fd) = r? else {
        return Ok(None);
    };
    let owed = owed.unwrap_or_default();
    let ranges: Vec<(u64, u64)> = merged_spans(owed);
    let uffd = crate::lazy::uffd::arm(stub.pid, fd, &ranges)?;
    // Nothing may have populated an owed page since it was dropped.
    crate::lazy::uffd::check_missing(stub.pid, &ranges)?;
    Ok(Some(uffd))
}

/// Spans `(addr, pages)` as merged `(start, end)` ranges.
fn merged_spans(spans: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &(a, n) in spans {
        let end = a + n * ferry_protocol::model::PAGE_SIZE;
        match out.last_mut() {
            Some(l) if l.1 == a => l.1 = end,
            _ => out.push((a, end)),
        }
    }
    out
}

fn apply_state(
    stub: &mut stub::Stub,
    img: &ProcessImage,
    opened: &Opened,
    owed: Option<&[(u64, u64)]>,
    others: &mut Vec<Tracee>,
) -> Result<Option<std::os::fd::OwnedFd>> {
    let pid = stub.pid;
    let tramp = stub.tramp_range();
    let mut uffd = None;
    {
        let mut inj = stub.injector()?;
        memory::protect(&mut inj, &img.vmas)?;
        mm::apply(&mut inj, &img.mm)?;
        crate::files::install(&mut inj, &img.fds, opened)?;
        misc::apply(&mut inj, &img.misc)?;
        if owed.is_some() {
            // Before the credentials drop: see lazy::uffd.
            uffd = Some(crate::lazy::uffd::create_in(&mut inj, pid)?);
        }
        for t in img.threads.iter().skip(1) {
            others.push(threads::create(&mut inj, t)?);
        }
        threads::setup(&mut inj, &img.threads[0])?;
    }
    for (tr, t) in others.iter_mut().zip(img.threads.iter().skip(1)) {
        let mut inj = stub.injector_for(tr);
        threads::setup(&mut inj, t)?;
        misc::queue_signals(&mut inj, pid, Some(t.tid), &t.pending)?;
        misc::apply_creds(&mut inj, &img.misc.creds)?;
    }
    {
        let main = &img.threads[0];
        let mut inj = stub.injector()?;
        misc::queue_signals(&mut inj, pid, Some(main.tid), &main.pending)?;
        misc::queue_signals(&mut inj, pid, None, &img.misc.shared_pending)?;
        misc::apply_creds(&mut inj, &img.misc.creds)?;
        // Owed pages must fault: drop what earlier passes wrote there. Last
        // thing before the trampoline goes, after every other injection.
        for &(addr, pages) in owed.unwrap_or_default() {
            inj.call(
                "madvise(MADV_DONTNEED)",
                libc::SYS_madvise,
                &[
                    addr,
                    pages * ferry_protocol::model::PAGE_SIZE,
                    libc::MADV_DONTNEED as u64,
                ],
            )?;
        }
        inj.call(
            "munmap(trampoline)",
            libc::SYS_munmap,
            &[tramp.0, tramp.1 - tramp.0],
        )?;
    }
    let main = stub
        .main
        .as_ref()
        .ok_or_else(|| Error::Incompatible("stub lost its main thread".into()))?;
    threads::load_registers(main, &img.threads[0])?;
    for (tr, t) in others.iter().zip(img.threads.iter().skip(1)) {
        threads::load_registers(tr, t)?;
    }
    Ok(uffd)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_protocol::model::PAGE_SIZE;
    use ferry_protocol::pages::PageRun;

    /// A stub with a captured process's PID and layout; the layout then
    /// changes: one area goes, a new one comes, pages land in the new one.
    #[test]
    fn relayout_between_passes() {
        // A paused copy of this test process gives a real layout; its PID
        // is then freed for the stub.
        let child = crate::testutil::spawn_stub();
        let pid = child.0;
        let vmas = crate::dump::memory::collect_vmas(pid);
        drop(child);
        let vmas = vmas.expect("layout of the child");
        let host = crate::host::host_info();
        let tids = [pid];
        let mut r = Restorer::begin(pid, &tids, &host, &vmas).expect("begin");
        let maps = |pid: i32| crate::procfs::maps(pid).expect("maps");
        // Drop the first anonymous area, add one in a hole above everything.
        let gone = vmas
            .iter()
            .find(|v| matches!(v.kind, VmaKind::Anonymous))
            .expect("an anonymous area")
            .clone();
        let top = vmas
            .iter()
            .filter(|v| !matches!(v.kind, VmaKind::Special { .. }))
            .map(|v| v.end)
            .max()
            .expect("areas");
        let fresh = Vma {
            start: top + 64 * PAGE_SIZE,
            end: top + 68 * PAGE_SIZE,
            prot: (libc::PROT_READ | libc::PROT_WRITE) as u32,
            flags: libc::MAP_PRIVATE as u32,
            kind: VmaKind::Anonymous,
            name: None,
        };
        let mut new: Vec<Vma> = vmas.iter().filter(|v| **v != gone).cloned().collect();
        new.push(fresh.clone());
        new.sort_by_key(|v| v.start);
        r.relayout(&new).expect("relayout");
        let m = maps(pid);
        assert!(
            m.iter()
                .any(|e| e.start <= fresh.start && e.end >= fresh.end),
            "new area mapped"
        );
        assert!(
            !m.iter().any(|e| e.start < gone.end && e.end > gone.start),
            "old area unmapped: {gone:?}"
        );
        let batch = PageBatch {
            runs: vec![PageRun {
                addr: fresh.start + PAGE_SIZE,
                pages: 1,
                zero: false,
            }],
            data: vec![0x5a; PAGE_SIZE as usize],
        };
        r.write_batch(&batch).expect("write into the new area");
        let mut back = vec![0u8; PAGE_SIZE as usize];
        ferry_parasite::mem::read(pid, fresh.start + PAGE_SIZE, &mut back).expect("read");
        assert!(back.iter().all(|&b| b == 0x5a));
        // In a later pass a zero page drops what an earlier one wrote.
        let zero = PageBatch {
            runs: vec![PageRun {
                addr: fresh.start + PAGE_SIZE,
                pages: 1,
                zero: true,
            }],
            data: Vec::new(),
        };
        r.write_batch(&zero).expect("zero page");
        ferry_parasite::mem::read(pid, fresh.start + PAGE_SIZE, &mut back).expect("read");
        assert!(back.iter().all(|&b| b == 0), "page dropped");
        // Pages in the removed area are refused now.
        let stale = PageBatch {
            runs: vec![PageRun {
                addr: gone.start,
                pages: 1,
                zero: false,
            }],
            data: vec![1; PAGE_SIZE as usize],
        };
        assert!(r.write_batch(&stale).is_err());
        // Dropping the restorer kills and reaps the stub.
        drop(r);
        assert!(!crate::procfs::exists(pid), "stub {pid} left behind");
    }
}
