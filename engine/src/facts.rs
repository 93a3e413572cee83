//! File facts: what identifies the executable and the mapped files of a
//! process, so that the destination of a migration can check, before the
//! source freezes anything, that it has the very same files.
//!
//! Identity is size and content hash (xxh3-128 of the whole file, streamed);
//! the modification time is carried too, and compared, because a restore
//! refuses a privately mapped file whose mtime changed
//! ([`crate::restore::check_files`]).

use crate::error::{Error, Result};
use ferry_protocol::wire::{ContentHash, FileFacts, RefuseCode};
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// The facts of the file opened at `open_path` (which may be a /proc magic
/// link to a mapped inode, such as `/proc/PID/map_files/…`), reported under
/// the name `path`.
pub fn file_facts(open_path: &Path, path: &str) -> Result<FileFacts> {
    let what = || format!("reading {path} (through {})", open_path.display());
    let mut f = std::fs::File::open(open_path).map_err(|e| Error::io(what(), e))?;
    let meta = f.metadata().map_err(|e| Error::io(what(), e))?;
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Error::io(what(), e)),
        };
        h.update(&buf[..n]);
    }
    Ok(FileFacts {
        path: path.to_string(),
        size: meta.size(),
        mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
        hash: ContentHash::Xxh3_128(h.digest128()),
    })
}

/// Why the local file `want.path` is not the one described by `want`, with
/// the refusal code that fits; `None` if it is the same file.
pub fn file_mismatch(want: &FileFacts) -> Option<(RefuseCode, String)> {
    let p = Path::new(&want.path);
    if let Err(e) = std::fs::metadata(p) {
        return Some((
            RefuseCode::FileMissing,
            format!("{} is missing on the destination: {e}", want.path),
        ));
    }
    let here = match file_facts(p, &want.path) {
        Ok(f) => f,
        Err(e) => {
            return Some((
                RefuseCode::FileMissing,
                format!("{} cannot be read on the destination: {e}", want.path),
            ))
        }
    };
    let differs = |why: String| {
        Some((
            RefuseCode::FileDiffers,
            format!("{} differs on the destination: {why}", want.path),
        ))
    };
    if here.size != want.size {
        return differs(format!(
            "size {} here, {} on the source",
            here.size, want.size
        ));
    }
    match (here.hash, want.hash) {
        (ContentHash::Xxh3_128(a), ContentHash::Xxh3_128(b)) if a == b => {}
        (ContentHash::Xxh3_128(_), ContentHash::Xxh3_128(_)) => {
            return differs("its content is not the same".into())
        }
        _ => return differs("the source sent a hash kind this side does not compute".into()),
    }
    if here.mtime_ns != want.mtime_ns {
        return differs(format!(
            "same content, but modification time {} here, {} on the source (a restore needs it unchanged)",
            here.mtime_ns, want.mtime_ns
        ));
    }
    None
}

/// Why the local file `f.path` is not the one described by `f`; `None` if
/// it is the same file.
pub fn check_file_facts(f: &FileFacts) -> Option<String> {
    file_mismatch(f).map(|(_, reason)| reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_and_different_files() {
        let dir = tempfile_dir();
        let p = dir.join("f");
        std::fs::write(&p, b"hello").unwrap();
        let ps = p.to_str().unwrap();
        let f = file_facts(&p, ps).unwrap();
        assert_eq!(f.size, 5);
        assert_eq!(check_file_facts(&f), None);
        let mut other = f.clone();
        other.hash = match f.hash {
            ContentHash::Xxh3_128(h) => ContentHash::Xxh3_128(h ^ 1),
            h => h,
        };
        let (code, why) = file_mismatch(&other).unwrap();
        assert_eq!(code, RefuseCode::FileDiffers);
        assert!(why.contains("content") && why.contains(ps), "{why}");
        other = f.clone();
        other.size = 6;
        assert!(check_file_facts(&other).unwrap().contains("size"));
        other = f.clone();
        other.path = format!("{ps}.missing");
        let (code, why) = file_mismatch(&other).unwrap();
        assert_eq!(code, RefuseCode::FileMissing);
        assert!(why.contains("missing"), "{why}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("ferry-facts-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
