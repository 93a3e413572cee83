//! Restore: rebuild a process from an image by remote control of a stub.
//!
//! ```text
//!  preflight (host, PID/TIDs free, files unchanged)
//!  stub::Stub::create      clone3(set_tid=PID), trampoline, tear down
//!  memory::place_special   vvar/vdso to the recorded addresses
//!  memory::map_areas/fill/protect
//!  mm::apply               PR_SET_MM_MAP + exe
//!  fds::install, misc::apply
//!  threads::create/setup   clone3(set_tid=TID) per thread
//!  signals, credentials, trampoline removed, registers, detach
//! ```

pub mod fds;
pub mod memory;
pub mod misc;
pub mod mm;
pub mod stub;
pub mod threads;

use crate::error::{Error, Result};
use ferry_parasite::Tracee;
use ferry_protocol::image::read_process_image;
use ferry_protocol::model::{ProcessImage, VmaKind, PAGE_SIZE};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

/// Top of the user address space on x86-64.
pub const TASK_SIZE: u64 = 0x0000_7fff_ffff_f000;

/// What a restore did.
#[derive(Debug, Clone)]
pub struct RestoreSummary {
    pub pid: i32,
    pub threads: usize,
    pub pages: u64,
    pub duration: Duration,
}

/// Recreate the process saved in `dir` with its PID and TIDs, and let it run.
pub fn restore(dir: &Path) -> Result<RestoreSummary> {
    let t0 = Instant::now();
    let img = read_process_image(dir)?;
    preflight(&img)?;
    let mut stub = stub::Stub::create(img.pid, &img.vmas)?;
    let pages = build(&mut stub, &img, dir)?;
    stub.disarm();
    Ok(RestoreSummary {
        pid: img.pid,
        threads: img.threads.len(),
        pages,
        duration: t0.elapsed(),
    })
}

/// Refuse early, with the reason, what cannot work here.
pub fn preflight(img: &ProcessImage) -> Result<()> {
    if let Some(why) = crate::host::incompatibility(&img.host, &crate::host::host_info()) {
        return Err(Error::Incompatible(why));
    }
    for t in &img.threads {
        if crate::procfs::exists(t.tid) {
            let what = if t.tid == img.pid { "PID" } else { "TID" };
            return Err(Error::Incompatible(format!(
                "{what} {} is already in use on this host",
                t.tid
            )));
        }
    }
    let mut checked = std::collections::HashSet::new();
    for v in &img.vmas {
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
    if !Path::new(&img.mm.exe_path).exists() {
        return Err(Error::Incompatible(format!(
            "executable {} is missing",
            img.mm.exe_path
        )));
    }
    Ok(())
}

fn build(stub: &mut stub::Stub, img: &ProcessImage, dir: &Path) -> Result<u64> {
    let pid = stub.pid;
    let tramp = (
        stub.tramp,
        stub.tramp + (1 + stub::SCRATCH_PAGES) * PAGE_SIZE,
    );
    let mut others: Vec<Tracee> = Vec::new();
    let pages;
    {
        let mut inj = stub.injector()?;
        memory::place_special(&mut inj, pid, &img.vmas, tramp)?;
        memory::map_areas(&mut inj, &img.vmas)?;
        pages = memory::fill(pid, &img.vmas, dir)?;
        memory::protect(&mut inj, &img.vmas)?;
        mm::apply(&mut inj, &img.mm)?;
        fds::install(&mut inj, &img.fds)?;
        misc::apply(&mut inj, &img.misc)?;
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
        inj.call(
            "munmap(trampoline)",
            libc::SYS_munmap,
            &[tramp.0, tramp.1 - tramp.0],
        )?;
    }
    let main = stub
        .main
        .take()
        .ok_or_else(|| Error::Incompatible("stub lost its main thread".into()))?;
    let loaded = (|| {
        threads::load_registers(&main, &img.threads[0])?;
        for (tr, t) in others.iter().zip(img.threads.iter().skip(1)) {
            threads::load_registers(tr, t)?;
        }
        Ok::<(), Error>(())
    })();
    if let Err(e) = loaded {
        stub.main = Some(main);
        return Err(e);
    }
    for t in others {
        t.detach()?;
    }
    main.detach()?;
    Ok(pages)
}
