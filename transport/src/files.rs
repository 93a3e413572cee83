//! Small file helpers: atomic replacement and create-if-absent.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::{io_err, Result};

/// A fresh temporary name next to `path` (same directory, so renames and
/// links stay on one file system).
fn temp_path(path: &Path) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp.{}.{n}", std::process::id()))
}

/// Writes `contents` to a new temporary file with permission bits `mode`,
/// flushed to disk. Returns its path.
fn write_temp(path: &Path, contents: &[u8], mode: u32) -> Result<PathBuf> {
    let tmp = temp_path(path);
    let write = || -> io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        // The umask may only have removed bits; make the mode exact.
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(contents)?;
        f.sync_all()
    };
    match write() {
        Ok(()) => Ok(tmp),
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            Err(io_err(&tmp)(e))
        }
    }
}

/// Flushes the directory entry changes of `path`'s directory (best effort).
fn sync_parent(path: &Path) {
    if let Some(dir) = path.parent() {
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
}

/// Atomically replaces (or creates) `path` with `contents` and mode `mode`.
pub(crate) fn replace_atomically(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    let tmp = write_temp(path, contents, mode)?;
    if let Err(e) = fs::rename(&tmp, path) {
        let _ = fs::remove_file(&tmp);
        return Err(io_err(path)(e));
    }
    sync_parent(path);
    Ok(())
}

/// Creates `path` with `contents` and mode `mode` only if it does not exist
/// yet; the file appears complete or not at all. Returns `false` if another
/// writer created it first (its content is then left alone).
pub(crate) fn create_if_absent(path: &Path, contents: &[u8], mode: u32) -> Result<bool> {
    let tmp = write_temp(path, contents, mode)?;
    let linked = fs::hard_link(&tmp, path);
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            sync_parent(path);
            Ok(true)
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(io_err(path)(e)),
    }
}
