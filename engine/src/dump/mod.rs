//! Checkpoint: freeze a process tree, capture its whole state into an image
//! directory, then kill it or let it run on.
//!
//! ```text
//!  tree::FrozenTree::freeze   the root, then each child once its parent is frozen
//!  per process: memory (areas; shared ones name a shmem object), threads,
//!               mm, misc, files (fds naming open files by id)
//!  files::FileCollector::finish   pipes' data, outside stdio
//!  pages: one page store per process, one per shared memory object
//! ```

pub mod memory;
pub mod misc;
pub mod mm;
pub mod threads;
pub mod tree;

use crate::error::{Error, Result};
use crate::files::FileCollector;
use crate::freeze::Frozen;
use crate::shmem::ShmemCollector;
use ferry_parasite::remote::{find_syscall_insn, Injector};
use ferry_protocol::image::write_tree_image;
use ferry_protocol::model::{ProcessImage, TaskIdentity, TreeImage, VmaKind, PAGE_SIZE};
use ferry_protocol::pages::{PageSpace, PageStats, PageWriter};
use std::path::Path;
use std::time::{Duration, Instant};
use tree::FrozenTree;

/// How to checkpoint.
#[derive(Debug, Clone)]
pub struct CheckpointOptions {
    /// Let the process continue after the checkpoint instead of killing it.
    pub leave_running: bool,
    /// Most bytes of files deleted while open whose contents are saved.
    pub max_deleted_bytes: u64,
}

impl Default for CheckpointOptions {
    fn default() -> Self {
        CheckpointOptions {
            leave_running: false,
            max_deleted_bytes: crate::files::deleted::DEFAULT_MAX_BYTES,
        }
    }
}

/// What a checkpoint did.
#[derive(Debug, Clone)]
pub struct CheckpointSummary {
    pub pid: i32,
    /// Live processes of the tree (zombies not counted).
    pub processes: usize,
    /// Threads of all processes.
    pub threads: usize,
    pub pages: PageStats,
    /// Bytes of the process image file.
    pub image_bytes: u64,
    /// From the first thread stopped until it was killed or resumed.
    pub frozen: Duration,
    /// The whole checkpoint.
    pub total: Duration,
}

/// Where the pages of a checkpoint go: a page store file, or the network.
pub trait PageSink {
    /// Take `data` (whole pages) as the contents of memory at `addr`.
    fn add(&mut self, addr: u64, data: &[u8]) -> Result<()>;
    /// Take `pages` pages at `addr` as zero (they hold nothing). The
    /// default passes zero-filled pages to [`PageSink::add`].
    fn add_zero(&mut self, addr: u64, pages: u64) -> Result<()> {
        let zeros = vec![0u8; 64 * PAGE_SIZE as usize];
        let end = addr + pages * PAGE_SIZE;
        let mut a = addr;
        while a < end {
            let n = (end - a).min(zeros.len() as u64) as usize;
            self.add(a, &zeros[..n])?;
            a += n as u64;
        }
        Ok(())
    }
}

impl PageSink for PageWriter {
    fn add(&mut self, addr: u64, data: &[u8]) -> Result<()> {
        PageWriter::add(self, addr, data).map_err(Into::into)
    }
    fn add_zero(&mut self, addr: u64, pages: u64) -> Result<()> {
        PageWriter::add_zero(self, addr, pages).map_err(Into::into)
    }
}

/// A frozen process tree with its captured state, waiting for the caller's
/// decision: [`Captured::kill`] once the image has taken over (written to
/// disk, or running elsewhere), or [`Captured::thaw`] to let the tree go
/// on untouched. Dropping it thaws the tree (ptrace detach).
///
/// ptrace binds a tracee to the OS thread that seized it: create, kill and
/// thaw a `Captured` on the same thread.
pub struct Captured {
    frozen: FrozenTree,
    /// The captured state (memory contents go to [`PageSink`]s).
    pub tree: TreeImage,
    shmem: ShmemCollector,
    /// What the page stores hold (for [`Captured::capture`]).
    pub pages: PageStats,
    /// Bytes of the process image file (for [`Captured::capture`]).
    pub image_bytes: u64,
    frozen_at: Instant,
}

impl Captured {
    /// Freeze `pid` and its descendants and capture everything but memory
    /// contents; read those with [`Captured::dump_pages`] while they stay
    /// frozen. On error the tree is resumed untouched.
    pub fn freeze(pid: i32) -> Result<Captured> {
        Self::freeze_with(
            pid,
            tree::Scope::Tree,
            crate::files::deleted::DEFAULT_MAX_BYTES,
        )
    }

    /// [`Captured::freeze`] of `scope`, saving at most `max_deleted_bytes`
    /// of the contents of files deleted while open.
    pub fn freeze_with(pid: i32, scope: tree::Scope, max_deleted_bytes: u64) -> Result<Captured> {
        let mut frozen = FrozenTree::freeze_scope(pid, scope)?;
        let frozen_at = Instant::now();
        let mut shmem = ShmemCollector::new();
        match capture_tree(&mut frozen, &mut shmem, max_deleted_bytes) {
            Ok(tree) => Ok(Captured {
                frozen,
                tree,
                shmem,
                pages: PageStats::default(),
                image_bytes: 0,
                frozen_at,
            }),
            Err(e) => {
                if let Err(te) = frozen.thaw() {
                    tracing::error!("resuming the tree of {pid} after a failed checkpoint: {te}");
                }
                Err(e)
            }
        }
    }

    /// The root process (the only one of a single-process tree).
    pub fn task(&self) -> &ProcessImage {
        &self.tree.tasks[0]
    }

    /// Send every saved page of the frozen root process to `sink`.
    pub fn dump_pages(&self, sink: &mut dyn PageSink) -> Result<()> {
        let t = self.task();
        memory::dump_pages(t.pid, &t.vmas, sink)
    }

    /// Send the contents of shared memory object `id` of the frozen tree to
    /// `sink` (addressed by offset).
    pub fn dump_shmem(
        &self,
        id: ferry_protocol::model::ShmemId,
        sink: &mut dyn PageSink,
    ) -> Result<()> {
        self.shmem.dump_contents(id, sink)
    }

    /// Freeze `pid` and its descendants and write their image into `dir`.
    /// On any error the tree is resumed untouched and the partial image
    /// files are removed.
    pub fn capture(pid: i32, dir: &Path, max_deleted_bytes: u64) -> Result<Captured> {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
        let mut c = Captured::freeze_with(pid, tree::Scope::Tree, max_deleted_bytes)?;
        let t = Instant::now();
        match c.write_to(dir) {
            Ok(()) => {
                tracing::info!(
                    "capture of {pid}: state {:.1} ms, pages and image {:.1} ms",
                    ms(t - c.frozen_at),
                    ms(t.elapsed())
                );
                Ok(c)
            }
            Err(e) => {
                remove_image_files(dir);
                if let Err(te) = c.frozen.thaw() {
                    tracing::error!("resuming the tree of {pid} after a failed checkpoint: {te}");
                }
                Err(e)
            }
        }
    }

    fn write_to(&mut self, dir: &Path) -> Result<()> {
        let mut total = PageStats::default();
        let mut add = |s: PageStats| {
            total.batches += s.batches;
            total.pages += s.pages;
            total.zero_pages += s.zero_pages;
            total.data_pages += s.data_pages;
            total.raw_bytes += s.raw_bytes;
            total.bytes_written += s.bytes_written;
        };
        for t in &self.tree.tasks {
            let mut writer = PageWriter::create_space(dir, PageSpace::Task(t.pid))?;
            memory::dump_pages(t.pid, &t.vmas, &mut writer)?;
            add(writer.finish()?);
        }
        for obj in &self.tree.shmem {
            let mut writer = PageWriter::create_space(dir, PageSpace::Shmem(obj.id))?;
            self.shmem.dump_contents(obj.id, &mut writer)?;
            add(writer.finish()?);
        }
        self.pages = total;
        self.image_bytes = write_tree_image(dir, &self.tree)?;
        Ok(())
    }

    /// Kill the tree; returns how long it was frozen.
    pub fn kill(self) -> Result<Duration> {
        self.frozen.kill()?;
        Ok(self.frozen_at.elapsed())
    }

    /// Let the tree continue; returns how long it was frozen.
    pub fn thaw(self) -> Result<Duration> {
        self.frozen.thaw()?;
        Ok(self.frozen_at.elapsed())
    }
}

/// Checkpoint `pid` and its descendants into `dir`, then kill them or let
/// them run on (`opts.leave_running`). On any error the tree is resumed
/// untouched and the partial image files are removed.
pub fn checkpoint(pid: i32, dir: &Path, opts: &CheckpointOptions) -> Result<CheckpointSummary> {
    let t0 = Instant::now();
    let c = Captured::capture(pid, dir, opts.max_deleted_bytes)?;
    let processes = c.tree.tasks.len();
    let threads = c.tree.tasks.iter().map(|t| t.threads.len()).sum();
    let (pages, image_bytes) = (c.pages, c.image_bytes);
    let frozen = if opts.leave_running {
        c.thaw()?
    } else {
        c.kill()?
    };
    Ok(CheckpointSummary {
        pid,
        processes,
        threads,
        pages,
        image_bytes,
        frozen,
        total: t0.elapsed(),
    })
}

/// Remove the image files of a failed checkpoint from `dir`.
fn remove_image_files(dir: &Path) {
    let _ = std::fs::remove_file(dir.join(ferry_protocol::image::PROCESS_FILE));
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        let ours =
            (name.starts_with("pages-") || name.starts_with("shmem-")) && name.ends_with(".img");
        if ours {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Everything but memory contents, from a frozen tree.
fn capture_tree(
    frozen: &mut FrozenTree,
    shmem: &mut ShmemCollector,
    max_deleted_bytes: u64,
) -> Result<TreeImage> {
    let host = crate::host::host_info();
    let mut files = FileCollector::with_deleted_limit(max_deleted_bytes);
    files.repair = frozen.repair.clone();
    let mut tasks = Vec::with_capacity(frozen.tasks.len());
    for (id, f) in frozen.tasks.iter_mut() {
        tasks.push(capture_task(*id, f, host.xstate_size, &mut files, shmem)?);
    }
    let locks = files.locks();
    let (files, pipes, deleted) = files.finish()?;
    Ok(TreeImage {
        host,
        tasks,
        zombies: frozen.zombies.clone(),
        files,
        pipes,
        shmem: shmem.objects(),
        deleted,
        locks,
    })
}

/// Everything but memory contents, from one frozen process.
fn capture_task(
    id: TaskIdentity,
    frozen: &mut Frozen,
    xstate_size: u32,
    files: &mut FileCollector,
    shmem: &mut ShmemCollector,
) -> Result<ProcessImage> {
    let pid = frozen.pid();
    // Areas first, then fds: the order [`tree::live_layout`] gives shared
    // memory objects their ids in.
    let vmas = memory::collect_vmas_with(pid, shmem)?;
    let fds = files.task(pid, shmem)?;
    let vdso = vmas
        .iter()
        .find(|v| matches!(&v.kind, VmaKind::Special { name } if name == "[vdso]"))
        .ok_or_else(|| Error::Unsupported {
            pid,
            what: "a process without a [vdso] area".into(),
        })?;
    let syscall_ip =
        find_syscall_insn(pid, vdso.start, vdso.end)?.ok_or_else(|| Error::Unsupported {
            pid,
            what: "a vDSO without a syscall instruction".into(),
        })?;
    let xsize = xstate_size as usize;
    let mut threads = Vec::new();
    for t in frozen.threads().iter_mut() {
        threads.push(threads::dump_thread(pid, t, syscall_ip, xsize)?);
    }
    let main = frozen
        .threads()
        .first_mut()
        .ok_or(Error::NoSuchProcess { pid })?;
    let mut inj = Injector::on_stack(main, syscall_ip)?;
    let mm = mm::collect(pid, &mut inj);
    let misc = misc::collect(pid, &mut inj);
    inj.finish()?;
    let (mm, misc) = (mm?, misc?);
    Ok(ProcessImage {
        pid,
        ppid: id.ppid,
        pgid: id.pgid,
        sid: id.sid,
        vmas,
        mm,
        threads,
        fds,
        misc,
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
