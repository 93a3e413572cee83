//! The known-peers store: the fingerprints this side accepts, kept in the
//! file `trusted_peers` in the configuration directory.
//!
//! File format: one peer per line, its fingerprint optionally followed by
//! white space and a free comment; blank lines and lines starting with `#`
//! are ignored.
//!
//! ```text
//! # ferry trusted peers
//! sha256:3f2a…9c01 source host db-1
//! ```

use std::collections::BTreeSet;
use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::identity::Fingerprint;
use crate::{files, io_err, Error, Result};

/// File name of the trust store in the config dir.
pub const TRUST_FILE: &str = "trusted_peers";

/// Header written at the top of a new trust file.
const HEADER: &str =
    "# ferry trusted peers: one fingerprint per line, optionally followed by a comment\n";

/// The set of trusted peer fingerprints, optionally backed by a file.
///
/// Clones share the same set: a [`TrustStore`] handed to an endpoint sees
/// later [`add`](TrustStore::add)s and [`reload`](TrustStore::reload)s.
#[derive(Clone)]
pub struct TrustStore {
    path: Option<PathBuf>,
    peers: Arc<RwLock<BTreeSet<Fingerprint>>>,
}

impl fmt::Debug for TrustStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrustStore")
            .field("path", &self.path)
            .field("peers", &*self.read())
            .finish()
    }
}

impl TrustStore {
    /// Loads `config_dir/trusted_peers`; a missing file is an empty store
    /// (created by the first [`add`](TrustStore::add)). A malformed line is
    /// an error naming the line.
    pub fn load(config_dir: &Path) -> Result<TrustStore> {
        let path = config_dir.join(TRUST_FILE);
        let peers = read_file(&path)?;
        Ok(TrustStore {
            path: Some(path),
            peers: Arc::new(RwLock::new(peers)),
        })
    }

    /// A store that lives only in memory (nothing is written by `add`).
    pub fn in_memory(peers: impl IntoIterator<Item = Fingerprint>) -> TrustStore {
        TrustStore {
            path: None,
            peers: Arc::new(RwLock::new(peers.into_iter().collect())),
        }
    }

    /// The backing file, if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Whether `fp` is trusted. Anything that is not a valid fingerprint is
    /// not trusted.
    pub fn contains(&self, fp: impl AsRef<str>) -> bool {
        match fp.as_ref().parse::<Fingerprint>() {
            Ok(fp) => self.read().contains(&fp),
            Err(_) => false,
        }
    }

    /// Trusts `fp`. See [`add_with_comment`](TrustStore::add_with_comment).
    pub fn add(&self, fp: &str) -> Result<bool> {
        self.add_with_comment(fp, "")
    }

    /// Trusts `fp`, with `comment` written after it in the file (control
    /// characters become spaces). Validates the fingerprint first. Returns
    /// `false` if it was already trusted (the file is then left unchanged).
    ///
    /// The file is re-read first, so entries added by other processes since
    /// [`load`](TrustStore::load) are kept, and replaced atomically. Two
    /// processes adding at the very same moment may still lose one entry.
    pub fn add_with_comment(&self, fp: &str, comment: &str) -> Result<bool> {
        let fp: Fingerprint = fp.parse()?;
        let Some(path) = &self.path else {
            return Ok(self.write().insert(fp));
        };
        let mut peers = self.write();
        let text = match fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(io_err(path)(e)),
        };
        let on_disk = parse(path, &text)?;
        if on_disk.contains(&fp) {
            *peers = on_disk;
            return Ok(false);
        }
        let mut new_text = if text.is_empty() {
            HEADER.to_string()
        } else {
            text
        };
        if !new_text.ends_with('\n') {
            new_text.push('\n');
        }
        new_text.push_str(fp.as_str());
        let comment: String = comment
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        let comment = comment.trim();
        if !comment.is_empty() {
            new_text.push(' ');
            new_text.push_str(comment);
        }
        new_text.push('\n');
        files::replace_atomically(path, new_text.as_bytes(), 0o644)?;
        *peers = on_disk;
        peers.insert(fp);
        Ok(true)
    }

    /// Re-reads the backing file (no-op for an in-memory store). On error
    /// the current set is kept.
    pub fn reload(&self) -> Result<()> {
        if let Some(path) = &self.path {
            let peers = read_file(path)?;
            *self.write() = peers;
        }
        Ok(())
    }

    /// Like [`contains`](TrustStore::contains), but on a miss re-reads the
    /// file once, so peers trusted by another process since loading count.
    pub fn contains_fresh(&self, fp: &Fingerprint) -> bool {
        if self.read().contains(fp) {
            return true;
        }
        if self.path.is_none() {
            return false;
        }
        if let Err(e) = self.reload() {
            tracing::warn!("cannot re-read the trust store: {e}");
        }
        self.read().contains(fp)
    }

    /// All trusted fingerprints, sorted.
    pub fn fingerprints(&self) -> Vec<Fingerprint> {
        self.read().iter().cloned().collect()
    }

    fn read(&self) -> RwLockReadGuard<'_, BTreeSet<Fingerprint>> {
        self.peers.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, BTreeSet<Fingerprint>> {
        self.peers.write().unwrap_or_else(|e| e.into_inner())
    }
}

fn read_file(path: &Path) -> Result<BTreeSet<Fingerprint>> {
    match fs::read_to_string(path) {
        Ok(text) => parse(path, &text),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(BTreeSet::new()),
        Err(e) => Err(io_err(path)(e)),
    }
}

fn parse(path: &Path, text: &str) -> Result<BTreeSet<Fingerprint>> {
    let mut peers = BTreeSet::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let word = line.split_whitespace().next().unwrap_or_default();
        let fp = word.parse::<Fingerprint>().map_err(|e| Error::TrustFile {
            path: path.to_path_buf(),
            line: i + 1,
            reason: e.to_string(),
        })?;
        peers.insert(fp);
    }
    Ok(peers)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(n: u8) -> Fingerprint {
        Fingerprint::of_der(&[n])
    }

    #[test]
    fn add_contains_reload() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = TrustStore::load(tmp.path()).expect("load empty");
        assert!(store.fingerprints().is_empty());
        assert!(!store.contains(fp(1)));

        assert!(store
            .add_with_comment(fp(1).as_str(), "host\tone")
            .expect("add"));
        assert!(store.contains(fp(1)));
        assert!(!store.contains(fp(2)));
        // Upper case input is the same fingerprint.
        assert!(!store.add(&fp(1).as_str().to_uppercase()).expect("re-add"));
        let before = fs::read_to_string(tmp.path().join(TRUST_FILE)).expect("read");
        assert!(!store.add(fp(1).as_str()).expect("idempotent"));
        let after = fs::read_to_string(tmp.path().join(TRUST_FILE)).expect("read");
        assert_eq!(before, after);
        assert!(after.contains(&format!("{} host one\n", fp(1))), "{after}");

        assert!(store.add(fp(2).as_str()).expect("add 2"));
        let reloaded = TrustStore::load(tmp.path()).expect("reload");
        let mut want = vec![fp(1), fp(2)];
        want.sort();
        assert_eq!(reloaded.fingerprints(), want);
        assert!(reloaded.contains(fp(2)));
        assert!(!reloaded.contains("garbage"));
    }

    #[test]
    fn add_rejects_invalid_fingerprints() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = TrustStore::load(tmp.path()).expect("load");
        for bad in ["", "sha256:abc", "md5:00", "sha256:zz"] {
            assert!(
                matches!(store.add(bad), Err(Error::InvalidFingerprint { .. })),
                "accepted {bad:?}"
            );
        }
        assert!(!tmp.path().join(TRUST_FILE).exists());
    }

    #[test]
    fn add_keeps_entries_of_other_writers_and_comments() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join(TRUST_FILE);
        fs::write(&path, format!("# mine\n\n{} old peer", fp(1))).expect("write");
        let a = TrustStore::load(tmp.path()).expect("a");
        let b = TrustStore::load(tmp.path()).expect("b");
        assert!(a.add(fp(2).as_str()).expect("a adds"));
        assert!(b.add(fp(3).as_str()).expect("b adds"));
        let text = fs::read_to_string(&path).expect("read");
        assert!(text.starts_with("# mine\n\n"), "{text}");
        let all = TrustStore::load(tmp.path()).expect("load");
        assert_eq!(all.fingerprints().len(), 3, "{text}");
        // A store sees other writers after reload / contains_fresh.
        assert!(!a.contains(fp(3)));
        assert!(a.contains_fresh(&fp(3)));
        assert!(!a.contains_fresh(&fp(4)));
    }

    #[test]
    fn malformed_line_is_reported() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join(TRUST_FILE);
        fs::write(&path, format!("{}\nsha256:nothex comment\n", fp(1))).expect("write");
        let err = TrustStore::load(tmp.path()).expect_err("accepted malformed");
        assert!(matches!(err, Error::TrustFile { line: 2, .. }), "{err}");
    }

    #[test]
    fn in_memory_store() {
        let store = TrustStore::in_memory([fp(1)]);
        assert!(store.contains(fp(1)));
        assert!(store.add(fp(2).as_str()).expect("add"));
        assert!(store.contains_fresh(&fp(2)));
        assert!(store.path().is_none());
    }
}
