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
//! [`TreeRestorer`] builds a tree as its pages arrive (pre-copy migration:
//! from the first pass's layout on, before the freeze); [`restore`] drives
//! it from an image directory.

pub mod memory;
pub mod misc;
pub mod mm;
pub mod stub;
pub mod threads;
pub mod tree;
pub mod trusted;

use crate::error::{Error, Result};
use crate::files::{Opened, StdioPolicy};
use ferry_parasite::Tracee;
use ferry_protocol::model::{HostInfo, ProcessImage, TreeImage, Vma, VmaKind};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;
pub use tree::{restore, Ready, TreeRestorer};

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

/// Everything after the pages: protections, mm, fds, signals, threads,
/// credentials, registers. Threads stay stopped. With `owed` (lazy), those
/// pages are dropped and a userfaultfd is armed over them.
/// `root`: the tree's root, whose parent here is the restorer (its
/// parent-death signal is not set).
pub(crate) fn build_task(
    stub: &mut stub::Stub,
    img: &ProcessImage,
    opened: &Opened,
    owed: Option<&[(u64, u64)]>,
    root: bool,
) -> Result<Option<userfaultfd::Uffd>> {
    let mut others = Vec::new();
    let r = apply_state(stub, img, opened, owed, root, &mut others);
    // Tracked by the stub in every case: killed with it on failure.
    stub.others.append(&mut others);
    let Some(fd) = r? else {
        return Ok(None);
    };
    let owed = owed.unwrap_or_default();
    let spans: Vec<(u64, u64)> = merged_spans(owed);
    let uffd = crate::lazy::uffd::arm(stub.pid, fd, &lazy_areas(&img.vmas, &spans))?;
    // Nothing may have populated an owed page since it was dropped.
    crate::lazy::uffd::check_missing(stub.pid, &spans)?;
    Ok(Some(uffd))
}

/// The ranges to register for missing-page faults: every area of `vmas`
/// that holds an owed span, whole (a span outside every area, which a
/// valid plan never has, as itself).
///
/// Registering only the owed spans would split an area at each page that
/// is not owed (a page around a stack pointer sent eagerly, a never
/// populated gap): the kernel keeps registered and unregistered parts in
/// separate areas, and an `mremap` of a range that spans two of them fails
/// with `EFAULT` (or, on kernels that move several areas at once, moves
/// the first and then fails), where on the source it was one area and
/// worked. Pages of a registered area that are not owed are either
/// populated already (no fault) or were never populated, and a fault
/// there gets a zero page ([`crate::lazy::pager`]).
fn lazy_areas(vmas: &[Vma], spans: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let private_anon =
        |v: &Vma| matches!(v.kind, VmaKind::Anonymous) && v.flags & libc::MAP_SHARED as u32 == 0;
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &(start, end) in spans {
        let mut covered = false;
        for v in vmas
            .iter()
            .filter(|v| private_anon(v) && v.start < end && start < v.end)
        {
            covered |= v.start <= start && end <= v.end;
            out.push((v.start, v.end));
        }
        if !covered {
            out.push((start, end));
        }
    }
    out.sort_unstable();
    // Registering one range twice would fail: keep them disjoint (this
    // also drops an area listed for each of its spans).
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (s, e) in out {
        match merged.last_mut() {
            Some(l) if s <= l.1 => l.1 = l.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    merged
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
    root: bool,
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
        if !root {
            misc::apply_pdeath_signal(&mut inj, img.misc.pdeath_signal)?;
        }
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
        misc::apply_creds(&mut inj, &img.misc.creds, img.misc.securebits)?;
    }
    {
        let main = &img.threads[0];
        let mut inj = stub.injector()?;
        misc::queue_signals(&mut inj, pid, Some(main.tid), &main.pending)?;
        misc::queue_signals(&mut inj, pid, None, &img.misc.shared_pending)?;
        misc::apply_creds(&mut inj, &img.misc.creds, img.misc.securebits)?;
        // After every thread's credentials, which reset it.
        misc::apply_dumpable(&mut inj, img.misc.dumpable)?;
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
    use ferry_protocol::model::{TaskIdentity, TaskLayout, TreeLayout, PAGE_SIZE};
    use ferry_protocol::pages::{PageBatch, PageRun, PageSpace};

    fn single(pid: i32, vmas: &[Vma]) -> TreeLayout {
        TreeLayout {
            tasks: vec![TaskLayout {
                id: TaskIdentity {
                    pid,
                    ppid: 1,
                    pgid: 1,
                    sid: 1,
                },
                vmas: vmas.to_vec(),
            }],
            zombies: vec![],
            shmem: vec![],
        }
    }

    fn area(start: u64, end: u64, kind: VmaKind, flags: i32) -> Vma {
        Vma {
            start,
            end,
            prot: (libc::PROT_READ | libc::PROT_WRITE) as u32,
            flags: flags as u32,
            kind,
            name: None,
        }
    }

    /// Owed spans with holes (eager pages around a stack pointer, a never
    /// populated gap) register their whole areas, so that no area is split
    /// between registered and unregistered parts (an `mremap` over such a
    /// split fails with EFAULT: seen in the lazy tests). Areas that are not
    /// private anonymous are never registered whole.
    #[test]
    fn lazy_areas_register_whole_private_anonymous_areas() {
        const P: u64 = PAGE_SIZE;
        let file = VmaKind::File(ferry_protocol::model::FileMapping {
            path: "/f".into(),
            offset: 0,
            dev: 0,
            ino: 0,
            size: 0,
            mtime_ns: 0,
        });
        let vmas = [
            // A thread stack merged with the region above it.
            area(0x100 * P, 0x600 * P, VmaKind::Anonymous, libc::MAP_PRIVATE),
            // Adjacent, also owed: the two ranges become one.
            area(0x600 * P, 0x700 * P, VmaKind::Anonymous, libc::MAP_PRIVATE),
            // Not owed at all: left alone.
            area(0x800 * P, 0x900 * P, VmaKind::Anonymous, libc::MAP_PRIVATE),
            area(0xa00 * P, 0xb00 * P, file, libc::MAP_PRIVATE),
            area(0xc00 * P, 0xd00 * P, VmaKind::Anonymous, libc::MAP_SHARED),
        ];
        let spans = [
            (0x100 * P, 0x1fd * P),
            // 0x1fd..0x202 went eagerly.
            (0x202 * P, 0x600 * P),
            (0x650 * P, 0x660 * P),
            // Outside every private anonymous area (never in a valid plan).
            (0xa10 * P, 0xa20 * P),
            (0xc10 * P, 0xc20 * P),
        ];
        assert_eq!(
            lazy_areas(&vmas, &spans),
            vec![
                (0x100 * P, 0x700 * P),
                (0xa10 * P, 0xa20 * P),
                (0xc10 * P, 0xc20 * P),
            ]
        );
        assert!(lazy_areas(&vmas, &[]).is_empty());
    }

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
        let mut r = TreeRestorer::begin(&single(pid, &vmas), &host).expect("begin");
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
        r.relayout(&single(pid, &new)).expect("relayout");
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
        r.write_batch(PageSpace::Task(pid), &batch)
            .expect("write into the new area");
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
        r.write_batch(PageSpace::Task(pid), &zero)
            .expect("zero page");
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
        assert!(r.write_batch(PageSpace::Task(pid), &stale).is_err());
        // Dropping the restorer kills and reaps the stub.
        drop(r);
        assert!(!crate::procfs::exists(pid), "stub {pid} left behind");
    }
}
