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
    let untrusted = |path: &Path, why: String| Error::UntrustedImage {
        path: path.display().to_string(),
        why,
    };
    let stat = |p: &Path| {
        std::fs::symlink_metadata(p).map_err(|e| Error::io(format!("stat {}", p.display()), e))
    };
    let owner_ok = |m: &std::fs::Metadata| m.uid() == 0 || m.uid() == uid;
    let writable_by_others = |m: &std::fs::Metadata| m.permissions().mode() & 0o022 != 0;
    let dir = std::path::absolute(dir).map_err(|e| Error::io(format!("{}", dir.display()), e))?;
    let m = stat(&dir)?;
    if m.file_type().is_symlink() {
        return Err(untrusted(&dir, "it is a symbolic link".into()));
    }
    check_one(&dir, &m, owner_ok(&m), writable_by_others(&m), uid)
        .map_err(|w| untrusted(&dir, w))?;
    let entries =
        std::fs::read_dir(&dir).map_err(|e| Error::io(format!("read {}", dir.display()), e))?;
    for e in entries {
        let e = e.map_err(|e| Error::io(format!("read {}", dir.display()), e))?;
        let p = e.path();
        let m = stat(&p)?;
        if m.file_type().is_symlink() {
            return Err(untrusted(&p, "it is a symbolic link".into()));
        }
        check_one(&p, &m, owner_ok(&m), writable_by_others(&m), uid)
            .map_err(|w| untrusted(&p, w))?;
    }
    for a in dir.ancestors().skip(1) {
        let m = stat(a)?;
        let sticky = m.permissions().mode() & 0o1000 != 0;
        if !owner_ok(&m) {
            return Err(untrusted(
                &dir,
                format!(
                    "the directory {} above it belongs to uid {}, who could replace the image",
                    a.display(),
                    m.uid()
                ),
            ));
        }
        if writable_by_others(&m) && !sticky {
            return Err(untrusted(
                &dir,
                format!(
                    "the directory {} above it is writable by group or others (mode {:o}), \
                     who could replace the image",
                    a.display(),
                    m.permissions().mode() & 0o7777
                ),
            ));
        }
    }
    Ok(())
}

/// Why `path` is not trusted, if it is not.
fn check_one(
    path: &Path,
    m: &std::fs::Metadata,
    owner_ok: bool,
    writable_by_others: bool,
    uid: u32,
) -> std::result::Result<(), String> {
    if !owner_ok {
        return Err(format!(
            "it belongs to uid {}, not to root or to the invoking user (uid {uid})",
            m.uid()
        ));
    }
    if writable_by_others {
        return Err(format!(
            "it is writable by group or others (mode {:o}): run `chmod go-w {}`",
            m.permissions().mode() & 0o7777,
            path.display()
        ));
    }
    Ok(())
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
