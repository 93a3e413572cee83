//! The process image file (`process.img`): a versioned, checksummed container
//! for a [`TreeImage`] (a process tree). Older versions are refused with a
//! clear message: version 1 held a single process, version 2 a tree without
//! event fds, FIFOs, inotify, locks, epoll, pidfds or sockets.
//!
//! # Layout
//!
//! All integers are little-endian. The file is a fixed 32-byte header
//! followed by the payload:
//!
//! | offset | size | field                                               |
//! |-------:|-----:|-----------------------------------------------------|
//! |      0 |    8 | magic `b"FERRYIMG"`                                 |
//! |      8 |    4 | format version ([`IMAGE_VERSION`])                  |
//! |     12 |    4 | kind of payload ([`KIND_PROCESS`] for a process)    |
//! |     16 |    8 | payload length in bytes                             |
//! |     24 |    8 | xxh3-64 (seed 0) of the payload                     |
//! |     32 |    n | payload: the [`TreeImage`], postcard-encoded        |
//!
//! The file ends exactly after the payload. Reading checks, in order: the
//! file exists, the header is complete, the magic, the version, the kind, the
//! payload length (bounded by [`MAX_PAYLOAD`] and equal to what the file
//! holds), the checksum, the decoding, and finally
//! [`TreeImage::validate`]. Each failure is a distinct [`ImageError`].
//!
//! Writing goes to a temporary file in the same directory, which is synced
//! and renamed over [`PROCESS_FILE`], so a reader never sees a half-written
//! image.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use thiserror::Error;

use crate::model::TreeImage;
use crate::validate::ValidationError;

/// Current (and newest readable) version of the image file format.
pub const IMAGE_VERSION: u32 = 3;
/// Oldest image file format version this build can still read.
pub const MIN_IMAGE_VERSION: u32 = 3;
/// Name of the process image file inside an image directory.
pub const PROCESS_FILE: &str = "process.img";
/// Magic bytes at the start of every ferry image file.
pub const IMAGE_MAGIC: [u8; 8] = *b"FERRYIMG";
/// Payload kind: a postcard-encoded [`TreeImage`].
pub const KIND_PROCESS: u32 = 1;
/// Size of the fixed header.
pub const HEADER_LEN: usize = 32;
/// Largest payload accepted (the process image holds no memory contents).
pub const MAX_PAYLOAD: u64 = 1 << 30;

/// Why an image file could not be written or read.
#[derive(Debug, Error)]
pub enum ImageError {
    /// The image file does not exist.
    #[error("image file {path} does not exist")]
    Missing { path: PathBuf },
    /// Any other I/O failure.
    #[error("I/O error on image file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The file does not start with [`IMAGE_MAGIC`].
    #[error("{path} is not a ferry image (magic {found:02x?}, expected {expected:02x?})")]
    NotAnImage {
        path: PathBuf,
        found: [u8; 8],
        expected: [u8; 8],
    },
    /// Written by a newer ferry.
    #[error("image {path}: image version {found} is newer than this ferry supports ({supported}): upgrade ferry")]
    VersionTooNew {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    /// Written by a ferry too old for this one to read.
    #[error("image {path}: image version {found} is older than the oldest this ferry supports ({oldest}): re-create the image")]
    VersionTooOld {
        path: PathBuf,
        found: u32,
        oldest: u32,
    },
    /// The header's kind field is not the one expected for this file.
    #[error("image {path}: payload kind {found}, expected {expected}")]
    WrongKind {
        path: PathBuf,
        found: u32,
        expected: u32,
    },
    /// The file ends before the header or the payload does.
    #[error("image file {path} is truncated: {found} bytes, expected {expected}")]
    Truncated {
        path: PathBuf,
        found: u64,
        expected: u64,
    },
    /// Extra bytes after the payload.
    #[error("image file {path} is corrupt: {found} bytes, expected {expected}")]
    TrailingData {
        path: PathBuf,
        found: u64,
        expected: u64,
    },
    /// The declared payload length exceeds [`MAX_PAYLOAD`].
    #[error("image file {path} is corrupt: payload of {found} bytes exceeds the limit of {max}")]
    TooLarge { path: PathBuf, found: u64, max: u64 },
    /// The payload's checksum does not match the header.
    #[error("image file {path} is corrupt: checksum mismatch (header {expected:#018x}, payload {found:#018x})")]
    ChecksumMismatch {
        path: PathBuf,
        expected: u64,
        found: u64,
    },
    /// The payload could not be decoded (despite a good checksum).
    #[error("image file {path}: cannot decode payload: {source}")]
    Decode {
        path: PathBuf,
        #[source]
        source: postcard::Error,
    },
    /// The payload decodes but has bytes left over.
    #[error("image file {path}: {extra} undecoded bytes after the payload")]
    DecodeTrailing { path: PathBuf, extra: usize },
    /// The image could not be encoded.
    #[error("cannot encode image for {path}: {source}")]
    Encode {
        path: PathBuf,
        #[source]
        source: postcard::Error,
    },
    /// The image decodes but breaks an invariant (also refused on write).
    #[error("image {path} is invalid: {source}")]
    Invalid {
        path: PathBuf,
        #[source]
        source: ValidationError,
    },
}

/// The decoded fixed header of an image file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageHeader {
    /// Format version.
    pub version: u32,
    /// Payload kind.
    pub kind: u32,
    /// Payload length in bytes.
    pub payload_len: u64,
    /// xxh3-64 of the payload.
    pub checksum: u64,
}

impl ImageHeader {
    /// Serializes the header, magic included.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..8].copy_from_slice(&IMAGE_MAGIC);
        h[8..12].copy_from_slice(&self.version.to_le_bytes());
        h[12..16].copy_from_slice(&self.kind.to_le_bytes());
        h[16..24].copy_from_slice(&self.payload_len.to_le_bytes());
        h[24..32].copy_from_slice(&self.checksum.to_le_bytes());
        h
    }

    /// Parses a header; only the magic is checked here.
    pub fn from_bytes(path: &Path, h: &[u8; HEADER_LEN]) -> Result<Self, ImageError> {
        let mut magic = [0u8; 8];
        magic.copy_from_slice(&h[0..8]);
        if magic != IMAGE_MAGIC {
            return Err(ImageError::NotAnImage {
                path: path.to_path_buf(),
                found: magic,
                expected: IMAGE_MAGIC,
            });
        }
        let u32_at = |o: usize| u32::from_le_bytes([h[o], h[o + 1], h[o + 2], h[o + 3]]);
        let u64_at = |o: usize| (u64::from(u32_at(o + 4)) << 32) | u64::from(u32_at(o));
        Ok(Self {
            version: u32_at(8),
            kind: u32_at(12),
            payload_len: u64_at(16),
            checksum: u64_at(24),
        })
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ImageError + '_ {
    move |source| {
        if source.kind() == io::ErrorKind::NotFound {
            ImageError::Missing {
                path: path.to_path_buf(),
            }
        } else {
            ImageError::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    }
}

static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// Writes `parts` to `dir/name` atomically (temporary file, fsync, rename).
pub(crate) fn write_atomic(dir: &Path, name: &str, parts: &[&[u8]]) -> Result<u64, ImageError> {
    let path = dir.join(name);
    let seq = TMP_SEQ.fetch_add(1, Ordering::Relaxed);
    let tmp = dir.join(format!(".{name}.tmp.{}.{seq}", std::process::id()));
    let result = (|| {
        let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
        let mut n = 0u64;
        for p in parts {
            f.write_all(p).map_err(io_err(&tmp))?;
            n += p.len() as u64;
        }
        f.sync_all().map_err(io_err(&tmp))?;
        drop(f);
        fs::rename(&tmp, &path).map_err(io_err(&path))?;
        Ok(n)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Writes `img` to `dir/`[`PROCESS_FILE`] and returns the bytes written.
///
/// The image is validated first: an image that would be refused on reading
/// is refused on writing ([`ImageError::Invalid`]).
pub fn write_tree_image(dir: &Path, img: &TreeImage) -> Result<u64, ImageError> {
    let path = dir.join(PROCESS_FILE);
    img.validate().map_err(|source| ImageError::Invalid {
        path: path.clone(),
        source,
    })?;
    let payload = postcard::to_stdvec(img).map_err(|source| ImageError::Encode {
        path: path.clone(),
        source,
    })?;
    let header = ImageHeader {
        version: IMAGE_VERSION,
        kind: KIND_PROCESS,
        payload_len: payload.len() as u64,
        checksum: xxhash_rust::xxh3::xxh3_64(&payload),
    };
    write_atomic(dir, PROCESS_FILE, &[&header.to_bytes(), &payload])
}

/// Reads, checks and decodes a payload of `kind` from the file at `path`.
pub(crate) fn read_payload(path: &Path, kind: u32) -> Result<Vec<u8>, ImageError> {
    let mut f = File::open(path).map_err(io_err(path))?;
    let file_len = f.metadata().map_err(io_err(path))?.len();
    if file_len < HEADER_LEN as u64 {
        // Still check the magic of what is there, so a short random file is
        // "not a ferry image" rather than "truncated".
        let mut buf = Vec::new();
        f.read_to_end(&mut buf).map_err(io_err(path))?;
        let n = buf.len().min(IMAGE_MAGIC.len());
        if buf[..n] != IMAGE_MAGIC[..n] {
            let mut found = [0u8; 8];
            found[..n].copy_from_slice(&buf[..n]);
            return Err(ImageError::NotAnImage {
                path: path.to_path_buf(),
                found,
                expected: IMAGE_MAGIC,
            });
        }
        return Err(ImageError::Truncated {
            path: path.to_path_buf(),
            found: file_len,
            expected: HEADER_LEN as u64,
        });
    }
    let mut hbuf = [0u8; HEADER_LEN];
    f.read_exact(&mut hbuf).map_err(io_err(path))?;
    let h = ImageHeader::from_bytes(path, &hbuf)?;
    if h.version > IMAGE_VERSION {
        return Err(ImageError::VersionTooNew {
            path: path.to_path_buf(),
            found: h.version,
            supported: IMAGE_VERSION,
        });
    }
    if h.version < MIN_IMAGE_VERSION {
        return Err(ImageError::VersionTooOld {
            path: path.to_path_buf(),
            found: h.version,
            oldest: MIN_IMAGE_VERSION,
        });
    }
    if h.kind != kind {
        return Err(ImageError::WrongKind {
            path: path.to_path_buf(),
            found: h.kind,
            expected: kind,
        });
    }
    if h.payload_len > MAX_PAYLOAD {
        return Err(ImageError::TooLarge {
            path: path.to_path_buf(),
            found: h.payload_len,
            max: MAX_PAYLOAD,
        });
    }
    let expected = HEADER_LEN as u64 + h.payload_len;
    if file_len < expected {
        return Err(ImageError::Truncated {
            path: path.to_path_buf(),
            found: file_len,
            expected,
        });
    }
    if file_len > expected {
        return Err(ImageError::TrailingData {
            path: path.to_path_buf(),
            found: file_len,
            expected,
        });
    }
    // payload_len <= MAX_PAYLOAD (1 GiB) and the file really holds that many
    // bytes, so this allocation is bounded by what is on disk.
    let mut payload = Vec::with_capacity(h.payload_len as usize);
    (&mut f)
        .take(h.payload_len)
        .read_to_end(&mut payload)
        .map_err(io_err(path))?;
    if (payload.len() as u64) < h.payload_len {
        // The file shrank while we were reading it.
        return Err(ImageError::Truncated {
            path: path.to_path_buf(),
            found: HEADER_LEN as u64 + payload.len() as u64,
            expected,
        });
    }
    let sum = xxhash_rust::xxh3::xxh3_64(&payload);
    if sum != h.checksum {
        return Err(ImageError::ChecksumMismatch {
            path: path.to_path_buf(),
            expected: h.checksum,
            found: sum,
        });
    }
    Ok(payload)
}

/// Reads `dir/`[`PROCESS_FILE`], checks it and returns the validated image.
pub fn read_tree_image(dir: &Path) -> Result<TreeImage, ImageError> {
    let path = dir.join(PROCESS_FILE);
    let payload = read_payload(&path, KIND_PROCESS)?;
    let (img, rest): (TreeImage, _) =
        postcard::take_from_bytes(&payload).map_err(|source| ImageError::Decode {
            path: path.clone(),
            source,
        })?;
    if !rest.is_empty() {
        return Err(ImageError::DecodeTrailing {
            path,
            extra: rest.len(),
        });
    }
    img.validate()
        .map_err(|source| ImageError::Invalid { path, source })?;
    Ok(img)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::tests::sample_image;

    fn written() -> (tempfile::TempDir, TreeImage, Vec<u8>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let img = sample_image();
        let n = write_tree_image(dir.path(), &img).expect("write");
        let bytes = fs::read(dir.path().join(PROCESS_FILE)).expect("read back");
        assert_eq!(n, bytes.len() as u64);
        (dir, img, bytes)
    }

    fn rewrite(dir: &Path, bytes: &[u8]) {
        fs::write(dir.join(PROCESS_FILE), bytes).expect("rewrite");
    }

    /// Re-signs a modified payload so that only the later checks can fail.
    fn resign(bytes: &mut [u8]) {
        let len = (bytes.len() - HEADER_LEN) as u64;
        bytes[16..24].copy_from_slice(&len.to_le_bytes());
        let sum = xxhash_rust::xxh3::xxh3_64(&bytes[HEADER_LEN..]);
        bytes[24..32].copy_from_slice(&sum.to_le_bytes());
    }

    #[test]
    fn round_trip() {
        let (dir, img, bytes) = written();
        assert_eq!(&bytes[..8], b"FERRYIMG");
        assert_eq!(&bytes[8..12], &IMAGE_VERSION.to_le_bytes());
        assert_eq!(&bytes[12..16], &KIND_PROCESS.to_le_bytes());
        let back = read_tree_image(dir.path()).expect("read");
        assert_eq!(back, img);
        // No temporary file is left behind.
        let names: Vec<_> = fs::read_dir(dir.path())
            .expect("readdir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from(PROCESS_FILE)]);
    }

    #[test]
    fn overwrite_replaces() {
        let (dir, mut img, _) = written();
        img.tasks[0].ppid = 99;
        write_tree_image(dir.path(), &img).expect("write");
        assert_eq!(read_tree_image(dir.path()).expect("read").tasks[0].ppid, 99);
    }

    #[test]
    fn missing_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let e = read_tree_image(dir.path()).unwrap_err();
        assert!(matches!(e, ImageError::Missing { .. }), "{e}");
        assert!(e.to_string().contains("does not exist"));
    }

    #[test]
    fn bad_magic() {
        let (dir, _, mut bytes) = written();
        bytes[0] = b'X';
        rewrite(dir.path(), &bytes);
        let e = read_tree_image(dir.path()).unwrap_err();
        assert!(matches!(e, ImageError::NotAnImage { .. }), "{e}");
        assert!(e.to_string().contains("not a ferry image"), "{e}");
        // A tiny non-image file is "not an image" too, not "truncated".
        rewrite(dir.path(), b"hello");
        let e = read_tree_image(dir.path()).unwrap_err();
        assert!(matches!(e, ImageError::NotAnImage { .. }), "{e}");
    }

    #[test]
    fn newer_version() {
        let (dir, _, mut bytes) = written();
        bytes[8..12].copy_from_slice(&(IMAGE_VERSION + 1).to_le_bytes());
        rewrite(dir.path(), &bytes);
        let e = read_tree_image(dir.path()).unwrap_err();
        assert!(
            matches!(
                e,
                ImageError::VersionTooNew {
                    found,
                    supported: IMAGE_VERSION,
                    ..
                } if found == IMAGE_VERSION + 1
            ),
            "{e}"
        );
        assert!(
            e.to_string().contains(&format!(
                "image version {} is newer than this ferry supports ({IMAGE_VERSION}): upgrade ferry",
                IMAGE_VERSION + 1
            )),
            "{e}"
        );
    }

    #[test]
    fn older_version() {
        let (dir, _, mut bytes) = written();
        // A version-2 image (trees, before event fds, locks and sockets)
        // is refused.
        bytes[8..12].copy_from_slice(&2u32.to_le_bytes());
        rewrite(dir.path(), &bytes);
        let e = read_tree_image(dir.path()).unwrap_err();
        assert!(
            matches!(e, ImageError::VersionTooOld { found: 2, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("re-create the image"), "{e}");
    }

    #[test]
    fn wrong_kind() {
        let (dir, _, mut bytes) = written();
        bytes[12..16].copy_from_slice(&9u32.to_le_bytes());
        rewrite(dir.path(), &bytes);
        let e = read_tree_image(dir.path()).unwrap_err();
        assert!(
            matches!(
                e,
                ImageError::WrongKind {
                    found: 9,
                    expected: 1,
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn truncated() {
        let (dir, _, bytes) = written();
        for cut in [HEADER_LEN - 1, 8, HEADER_LEN, bytes.len() - 1] {
            rewrite(dir.path(), &bytes[..cut]);
            let e = read_tree_image(dir.path()).unwrap_err();
            assert!(matches!(e, ImageError::Truncated { .. }), "cut {cut}: {e}");
            assert!(e.to_string().contains("truncated"), "{e}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        rewrite(dir.path(), &longer);
        let e = read_tree_image(dir.path()).unwrap_err();
        assert!(matches!(e, ImageError::TrailingData { .. }), "{e}");
    }

    #[test]
    fn huge_declared_length() {
        let (dir, _, mut bytes) = written();
        bytes[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        rewrite(dir.path(), &bytes);
        let e = read_tree_image(dir.path()).unwrap_err();
        assert!(matches!(e, ImageError::TooLarge { .. }), "{e}");
    }

    #[test]
    fn flipped_bytes_are_caught() {
        let (dir, _, bytes) = written();
        // Every payload byte, and the checksum field itself.
        for i in (HEADER_LEN..bytes.len()).chain(24..32) {
            let mut b = bytes.clone();
            b[i] ^= 0x40;
            rewrite(dir.path(), &b);
            let e = read_tree_image(dir.path()).unwrap_err();
            assert!(
                matches!(e, ImageError::ChecksumMismatch { .. }),
                "byte {i}: {e}"
            );
            assert!(e.to_string().contains("is corrupt: checksum mismatch"));
        }
    }

    #[test]
    fn undecodable_payload() {
        let (dir, _, bytes) = written();
        // A payload cut short but correctly signed: decodes to an error.
        let mut b = bytes[..HEADER_LEN + 10].to_vec();
        resign(&mut b);
        rewrite(dir.path(), &b);
        let e = read_tree_image(dir.path()).unwrap_err();
        assert!(matches!(e, ImageError::Decode { .. }), "{e}");
        // Extra bytes after a complete payload.
        let mut b = bytes.clone();
        b.extend_from_slice(&[1, 2, 3]);
        resign(&mut b);
        rewrite(dir.path(), &b);
        let e = read_tree_image(dir.path()).unwrap_err();
        assert!(
            matches!(e, ImageError::DecodeTrailing { extra: 3, .. }),
            "{e}"
        );
    }

    #[test]
    fn invalid_image_rejected_on_read_and_write() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut img = sample_image();
        img.tasks[0].vmas[1].start = 0x40_4000; // overlaps vmas[0]
        let e = write_tree_image(dir.path(), &img).unwrap_err();
        assert!(matches!(e, ImageError::Invalid { .. }), "{e}");
        assert!(!dir.path().join(PROCESS_FILE).exists());

        // Forge a well-formed file holding the invalid image.
        let payload = postcard::to_stdvec(&img).expect("encode");
        let header = ImageHeader {
            version: IMAGE_VERSION,
            kind: KIND_PROCESS,
            payload_len: payload.len() as u64,
            checksum: xxhash_rust::xxh3::xxh3_64(&payload),
        };
        let mut bytes = header.to_bytes().to_vec();
        bytes.extend_from_slice(&payload);
        rewrite(dir.path(), &bytes);
        let e = read_tree_image(dir.path()).unwrap_err();
        assert!(
            matches!(
                e,
                ImageError::Invalid {
                    source: ValidationError::VmaOverlap { index: 1, .. },
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn garbage_payloads_never_panic() {
        let (dir, _, bytes) = written();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for round in 0..200 {
            let mut b = bytes.clone();
            for _ in 0..(1 + round % 8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let i = HEADER_LEN + (x as usize) % (b.len() - HEADER_LEN);
                b[i] = (x >> 32) as u8;
            }
            resign(&mut b);
            rewrite(dir.path(), &b);
            // Any outcome but a panic is acceptable; a success must be valid.
            if let Ok(img) = read_tree_image(dir.path()) {
                assert_eq!(img.validate(), Ok(()));
            }
        }
    }
}
