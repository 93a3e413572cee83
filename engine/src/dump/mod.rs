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
use ferry_protocol::model::{ProcessImage, VmaKind, PAGE_SIZE};
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

/// A frozen process with its captured state, waiting for the caller's
/// decision: [`Captured::kill`] once the image has taken over (written to
/// disk, or running elsewhere), or [`Captured::thaw`] to let the process go
/// on untouched. Dropping it thaws the process (ptrace detach).
///
/// ptrace binds a tracee to the OS thread that seized it: create, kill and
/// thaw a `Captured` on the same thread.
pub struct Captured {
    frozen: Frozen,
    /// The captured state (memory contents go to a [`PageSink`]).
    pub image: ProcessImage,
    /// What the page store holds (for [`Captured::capture`]).
    pub pages: PageStats,
    /// Bytes of the process image file (for [`Captured::capture`]).
    pub image_bytes: u64,
    frozen_at: Instant,
}

impl Captured {
    /// Freeze `pid` and capture everything but memory contents; read those
    /// with [`Captured::dump_pages`] while it stays frozen. On error the
    /// process is resumed untouched.
    pub fn freeze(pid: i32) -> Result<Captured> {
        let mut frozen = Frozen::freeze(pid)?;
        let frozen_at = Instant::now();
        match capture_state(&mut frozen) {
            Ok(image) => Ok(Captured {
                frozen,
                image,
                pages: PageStats::default(),
                image_bytes: 0,
                frozen_at,
            }),
            Err(e) => {
                if let Err(te) = frozen.thaw() {
                    tracing::error!("resuming {pid} after a failed checkpoint: {te}");
                }
                Err(e)
            }
        }
    }

    /// Send every saved page of the frozen process to `sink`.
    pub fn dump_pages(&self, sink: &mut dyn PageSink) -> Result<()> {
        memory::dump_pages(self.image.pid, &self.image.vmas, sink)
    }

    /// Freeze `pid` and write its image into `dir`. On any error the
    /// process is resumed untouched and the partial image files are removed.
    pub fn capture(pid: i32, dir: &Path) -> Result<Captured> {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
        let mut c = Captured::freeze(pid)?;
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
                    tracing::error!("resuming {pid} after a failed checkpoint: {te}");
                }
                Err(e)
            }
        }
    }

    fn write_to(&mut self, dir: &Path) -> Result<()> {
        let mut writer = PageWriter::create(dir)?;
        self.dump_pages(&mut writer)?;
        self.pages = writer.finish()?;
        self.image_bytes = write_process_image(dir, &self.image)?;
        Ok(())
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

/// Everything but memory contents, from a frozen process.
fn capture_state(frozen: &mut Frozen) -> Result<ProcessImage> {
    let pid = frozen.pid();
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
    Ok(image)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
