//! Checkpoint: freeze a process, capture its whole state into an image
//! directory, then kill it or let it run on.

pub mod fds;
pub mod memory;
pub mod misc;
pub mod mm;
pub mod threads;

use crate::error::{Error, Result};
use crate::freeze::Frozen;
use ferry_parasite::remote::{find_syscall_insn, Injector};
use ferry_protocol::image::write_process_image;
use ferry_protocol::model::{ProcessImage, VmaKind};
use ferry_protocol::pages::{PageStats, PageWriter};
use std::path::Path;
use std::time::{Duration, Instant};

/// How to checkpoint.
#[derive(Debug, Clone, Default)]
pub struct CheckpointOptions {
    /// Let the process continue after the checkpoint instead of killing it.
    pub leave_running: bool,
}

/// What a checkpoint did.
#[derive(Debug, Clone)]
pub struct CheckpointSummary {
    pub pid: i32,
    pub threads: usize,
    pub pages: PageStats,
    /// Bytes of the process image file.
    pub image_bytes: u64,
    /// From the first thread stopped until it was killed or resumed.
    pub frozen: Duration,
    /// The whole checkpoint.
    pub total: Duration,
}

/// A process frozen with its image written to a directory, waiting for
/// the caller's decision: [`Captured::kill`] once the image has taken over
/// (written to disk, or running elsewhere), or [`Captured::thaw`] to let the
/// process go on untouched. Dropping it thaws the process (ptrace detach).
///
/// ptrace binds a tracee to the OS thread that seized it: create, kill and
/// thaw a `Captured` on the same thread.
pub struct Captured {
    frozen: Frozen,
    /// The captured state (memory contents are in the directory's page store).
    pub image: ProcessImage,
    /// What the page store holds.
    pub pages: PageStats,
    /// Bytes of the process image file.
    pub image_bytes: u64,
    frozen_at: Instant,
}

impl Captured {
    /// Freeze `pid` and write its image into `dir`. On any error the
    /// process is resumed untouched and the partial image files are removed.
    pub fn capture(pid: i32, dir: &Path) -> Result<Captured> {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
        let mut frozen = Frozen::freeze(pid)?;
        let frozen_at = Instant::now();
        match capture(&mut frozen, dir) {
            Ok((image, pages, image_bytes)) => Ok(Captured {
                frozen,
                image,
                pages,
                image_bytes,
                frozen_at,
            }),
            Err(e) => {
                remove_image_files(dir);
                if let Err(te) = frozen.thaw() {
                    tracing::error!("resuming {pid} after a failed checkpoint: {te}");
                }
                Err(e)
            }
        }
    }

    /// Kill the process; returns how long it was frozen.
    pub fn kill(self) -> Result<Duration> {
        self.frozen.kill()?;
        Ok(self.frozen_at.elapsed())
    }

    /// Let the process continue; returns how long it was frozen.
    pub fn thaw(self) -> Result<Duration> {
        self.frozen.thaw()?;
        Ok(self.frozen_at.elapsed())
    }
}

/// Checkpoint `pid` into `dir`, then kill it or let it run on
/// (`opts.leave_running`). On any error the process is resumed untouched
/// and the partial image files are removed.
pub fn checkpoint(pid: i32, dir: &Path, opts: &CheckpointOptions) -> Result<CheckpointSummary> {
    let t0 = Instant::now();
    let c = Captured::capture(pid, dir)?;
    let (threads, pages, image_bytes) = (c.image.threads.len(), c.pages, c.image_bytes);
    let frozen = if opts.leave_running {
        c.thaw()?
    } else {
        c.kill()?
    };
    Ok(CheckpointSummary {
        pid,
        threads,
        pages,
        image_bytes,
        frozen,
        total: t0.elapsed(),
    })
}

fn remove_image_files(dir: &Path) {
    for f in [
        ferry_protocol::image::PROCESS_FILE,
        ferry_protocol::pages::PAGES_FILE,
    ] {
        let _ = std::fs::remove_file(dir.join(f));
    }
}

fn capture(frozen: &mut Frozen, dir: &Path) -> Result<(ProcessImage, PageStats, u64)> {
    let pid = frozen.pid();
    let t_start = Instant::now();
    let host = crate::host::host_info();
    let fds = fds::collect(pid)?;
    let vmas = memory::collect_vmas(pid)?;
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
    let xsize = host.xstate_size as usize;
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

    let mut writer = PageWriter::create(dir)?;
    let t_state = t_start.elapsed();
    memory::dump_pages(pid, &vmas, &mut writer)?;
    let t_pages = t_start.elapsed();
    let pages = writer.finish()?;
    let t_sync = t_start.elapsed();
    let status = crate::procfs::read(pid, "status")?;
    let ppid = crate::procfs::status_field(&status, "PPid")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let image = ProcessImage {
        host,
        pid,
        ppid,
        vmas,
        mm,
        threads,
        fds,
        misc,
    };
    let bytes = write_process_image(dir, &image)?;
    tracing::info!(
        "capture of {pid}: state {:.1} ms, pages {:.1} ms, page store sync {:.1} ms, image {:.1} ms",
        ms(t_state),
        ms(t_pages - t_state),
        ms(t_sync - t_pages),
        ms(t_start.elapsed() - t_sync)
    );
    Ok((image, pages, bytes))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
