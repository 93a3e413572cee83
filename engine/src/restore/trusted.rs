//! Who could have written an image directory. `migrate restore` runs as
//! root and turns the image into running processes with the credentials it
//! names, so an image that another user could write (or replace) is a way
//! to run anything as anyone: it is refused before it is read.
//!
//! Trusted: the directory and every file in it are owned by root or by the
//! invoking user, are not symbolic links, and are writable by nobody else
//! (no group or other write bit); each directory above it is owned by root
//! or the invoking user, or cannot be used by others to swap the image out
//! (not writable by group or others, or sticky like `/tmp`).

use crate::error::{Error, Result};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

/// Refuse `dir` unless only root or `uid` could have written it.
pub fn check_image_dir(dir: &Path, uid: u32) -> Result<()> {
    let dir = std::path::absolute(dir).map_err(|e| Error::io(format!("{}", dir.display()), e))?;
    check_entry(&dir, uid)?;
    let entries =
        std::fs::read_dir(&dir).map_err(|e| Error::io(format!("read {}", dir.display()), e))?;
    for e in entries {
        let e = e.map_err(|e| Error::io(format!("read {}", dir.display()), e))?;
        check_entry(&e.path(), uid)?;
    }
    for a in dir.ancestors().skip(1) {
        let m = stat(a)?;
        let mode = m.permissions().mode();
        let why = if !owner_ok(&m, uid) {
            format!("belongs to uid {}", m.uid())
        } else if mode & 0o022 != 0 && mode & 0o1000 == 0 {
            format!("is writable by group or others (mode {:o})", mode & 0o7777)
        } else {
            continue;
        };
        return Err(untrusted(
            &dir,
            format!(
                "the directory {} above it {why}, who could replace the image",
                a.display()
            ),
        ));
    }
    Ok(())
}

/// The image directory itself or one of its files: no symbolic link,
/// owned by root or `uid`, writable by nobody else.
fn check_entry(path: &Path, uid: u32) -> Result<()> {
    let m = stat(path)?;
    let mode = m.permissions().mode();
    if m.file_type().is_symlink() {
        return Err(untrusted(path, "it is a symbolic link".into()));
    }
    if !owner_ok(&m, uid) {
        return Err(untrusted(
            path,
            format!(
                "it belongs to uid {}, not to root or to the invoking user (uid {uid})",
                m.uid()
            ),
        ));
    }
    if mode & 0o022 != 0 {
        return Err(untrusted(
            path,
            format!(
                "it is writable by group or others (mode {:o}): run `chmod go-w {}`",
                mode & 0o7777,
                path.display()
            ),
        ));
    }
    Ok(())
}

fn stat(p: &Path) -> Result<std::fs::Metadata> {
    std::fs::symlink_metadata(p).map_err(|e| Error::io(format!("stat {}", p.display()), e))
}

fn owner_ok(m: &std::fs::Metadata, uid: u32) -> bool {
    m.uid() == 0 || m.uid() == uid
}

fn untrusted(path: &Path, why: String) -> Error {
    Error::UntrustedImage {
        path: path.display().to_string(),
        why,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn chmod(p: &Path, mode: u32) {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }

    #[test]
    fn only_root_or_the_invoking_user_may_have_written_the_image() {
        let top = crate::testutil::TempDir::new("trusted");
        let dir = top.path.join("img");
        std::fs::create_dir(&dir).expect("mkdir");
        chmod(&dir, 0o755);
        let file = dir.join("process.img");
        std::fs::write(&file, b"x").expect("write");
        chmod(&file, 0o644);
        // SAFETY: getuid has no preconditions.
        let me = unsafe { libc::getuid() };
        check_image_dir(&dir, me).expect("a private image is trusted");

        chmod(&file, 0o664);
        let e = check_image_dir(&dir, me).expect_err("group-writable file");
        let m = e.to_string();
        assert!(m.contains("process.img") && m.contains("chmod go-w"), "{m}");
        chmod(&file, 0o644);

        chmod(&dir, 0o777);
        let e = check_image_dir(&dir, me).expect_err("world-writable directory");
        assert!(e.to_string().contains("writable by group or others"), "{e}");
        chmod(&dir, 0o755);

        // Owned by someone else (as root we can give it away).
        if me == 0 {
            std::os::unix::fs::lchown(&file, Some(65534), None).expect("chown");
            let e = check_image_dir(&dir, me).expect_err("another user's file");
            assert!(e.to_string().contains("uid 65534"), "{e}");
            // The same file is trusted when its owner restores it.
            check_image_dir(&dir, 65534).expect("the invoking user's own file");
            std::os::unix::fs::lchown(&file, Some(0), None).expect("chown back");
        }

        std::os::unix::fs::symlink(&file, dir.join("link")).expect("symlink");
        let e = check_image_dir(&dir, me).expect_err("a symlink inside");
        assert!(e.to_string().contains("symbolic link"), "{e}");
        std::fs::remove_file(dir.join("link")).expect("rm link");

        // A parent writable by others without the sticky bit.
        chmod(top.path.as_path(), 0o777);
        let e = check_image_dir(&dir, me).expect_err("open parent");
        assert!(e.to_string().contains("above it"), "{e}");
        chmod(top.path.as_path(), 0o1777);
        check_image_dir(&dir, me).expect("a sticky parent like /tmp is fine");
        chmod(top.path.as_path(), 0o700);
    }
}
