//! Regular files deleted while the tree held them open (a temporary file
//! unlinked at once, a log rotated away). Their contents exist nowhere but
//! in the open file, so they travel in the image: checkpoint reads each
//! inode once through `/proc/PID/fd/N`; restore makes an unnamed file
//! (`O_TMPFILE`) in the directory it was in (or the temp dir if that is
//! gone), fills it, and every open file description of it is reopened from
//! that one inode, so they stay one file. Above a size limit the checkpoint
//! is refused, naming the file and the limit.

use super::sys;
use crate::{Error, Result};
use ferry_protocol::model::{DeletedFile, DeletedId, OpenFile};
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Default limit on the saved contents of all deleted files of a tree.
pub const DEFAULT_MAX_BYTES: u64 = 64 << 20;

/// Deleted files found at checkpoint, by inode.
#[derive(Default)]
pub struct DeletedCollector {
    files: Vec<(u64, u64, DeletedFile)>,
    bytes: u64,
    /// Limit on `bytes`.
    pub max_bytes: u64,
}

impl DeletedCollector {
    /// A collector that refuses more than `max_bytes` of contents.
    pub fn new(max_bytes: u64) -> Self {
        DeletedCollector {
            max_bytes,
            ..Self::default()
        }
    }

    /// The id of the deleted file that fd `fd` of `pid` (link `link`,
    /// metadata `md`) opens, reading its contents the first time.
    pub fn add(
        &mut self,
        pid: i32,
        fd: i32,
        link: &str,
        md: &std::fs::Metadata,
    ) -> Result<DeletedId> {
        if let Some((_, _, d)) = self
            .files
            .iter()
            .find(|(dev, ino, _)| *dev == md.dev() && *ino == md.ino())
        {
            return Ok(d.id);
        }
        let path = link.strip_suffix(" (deleted)").unwrap_or(link).to_string();
        if self.bytes + md.size() > self.max_bytes {
            return Err(Error::UnsupportedFd {
                pid,
                fd,
                kind: format!(
                    "a deleted file ({path}, {} bytes) whose contents would bring the deleted \
                     files of the tree above the limit of {} bytes (`migrate checkpoint \
                     --max-deleted-mib` raises it; a migration carries at most 32 MiB)",
                    md.size(),
                    self.max_bytes
                ),
            });
        }
        let magic = format!("/proc/{pid}/fd/{fd}");
        let what = || format!("reading deleted file {path} through {magic}");
        let mut f = std::fs::File::open(&magic).map_err(|e| Error::io(what(), e))?;
        let mut data = Vec::with_capacity(md.size() as usize);
        f.read_to_end(&mut data).map_err(|e| Error::io(what(), e))?;
        self.bytes += data.len() as u64;
        let id = self.files.len() as DeletedId + 1;
        self.files.push((
            md.dev(),
            md.ino(),
            DeletedFile {
                id,
                path,
                mode: md.mode() & 0o7777,
                uid: md.uid(),
                gid: md.gid(),
                data,
            },
        ));
        Ok(id)
    }

    /// Every deleted file found.
    pub fn finish(self) -> Vec<DeletedFile> {
        self.files.into_iter().map(|(_, _, d)| d).collect()
    }
}

/// Make the unnamed file of `d`, filled with its contents.
pub fn create(d: &DeletedFile) -> Result<OwnedFd> {
    let parent = Path::new(&d.path)
        .parent()
        .filter(|p| p.is_dir())
        .map(Path::to_path_buf)
        .unwrap_or_else(std::env::temp_dir);
    let what = |op: &str| {
        format!(
            "recreating deleted file {} in {}: {op}",
            d.path,
            parent.display()
        )
    };
    let dir = super::cpath(&parent.to_string_lossy())?;
    let fd = sys::open_mode(
        &dir,
        libc::O_TMPFILE | libc::O_RDWR | libc::O_CLOEXEC,
        (d.mode & 0o7777) as libc::mode_t,
    )
    .map_err(|e| Error::io(what("O_TMPFILE"), e))?;
    let mut f = std::fs::File::from(fd.try_clone().map_err(|e| Error::io(what("dup"), e))?);
    f.write_all(&d.data)
        .map_err(|e| Error::io(what("write"), e))?;
    // SAFETY: fchown on an fd we own, integer arguments only.
    if unsafe { libc::fchown(fd.as_raw_fd(), d.uid, d.gid) } != 0 {
        return Err(Error::io(what("fchown"), std::io::Error::last_os_error()));
    }
    Ok(fd)
}

/// A new open file description of the deleted file held by `inode` for
/// `f` (its flags and position).
pub fn reopen(inode: &OwnedFd, f: &OpenFile, d: &str) -> Result<OwnedFd> {
    let path = format!("/proc/self/fd/{}", inode.as_raw_fd());
    let keep = libc::O_ACCMODE
        | libc::O_APPEND
        | libc::O_NONBLOCK
        | libc::O_NOATIME
        | libc::O_SYNC
        | libc::O_DSYNC;
    let fd = sys::open(
        &super::cpath(&path)?,
        (f.flags as i32 & keep) | libc::O_CLOEXEC,
    )
    .map_err(|e| Error::io(format!("restoring {d}: reopening the deleted file"), e))?;
    if f.pos != 0 {
        sys::seek_set(fd.as_fd(), f.pos)
            .map_err(|e| Error::io(format!("restoring {d}: lseek to {}", f.pos), e))?;
    }
    Ok(fd)
}
