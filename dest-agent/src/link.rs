//! The stop-and-copy control protocol between `migrate --to` (source) and
//! `dest-agent` (destination), carried on the first bidirectional QUIC
//! stream of a connection (opened by the source).
//!
//! ```text
//!  source                                   destination
//!  Hello {version, host}            ──────▶  version, arch, xstate, kernel
//!                                   ◀──────  HelloAck {version, host} | Refuse {reason}
//!  Prepare {pid, tids, exe, files}  ──────▶  PID/TIDs free, files identical
//!                                   ◀──────  Ready | Refuse {reason}
//!  (freeze, capture)
//!  Image {process_len, pages_len}   ──────▶
//!  <process.img bytes><pages.img bytes> ──▶  written to a fresh temp dir
//!                                   ◀──────  Running {pid, restore_ms} | Failed {reason}
//!  Done (source kills its copy)     ──────▶
//! ```
//!
//! The source may send `Abort {reason}` instead of `Image` (the capture
//! failed). Every message is one frame: a 4-byte little-endian payload
//! length (at most [`MAX_MSG`]) followed by the postcard encoding of [`Msg`].
//! Everything received is validated ([`Msg::validate`]) before use.

use anyhow::{bail, Context, Result};
use ferry_protocol::model::HostInfo;
use serde::{Deserialize, Serialize};
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Version of this protocol; both sides must speak the same one.
pub const VERSION: u32 = 1;
/// Largest control message payload.
pub const MAX_MSG: u32 = 1 << 20;
/// Largest `process.img` accepted (the image format's own bound plus room
/// for its header).
pub const MAX_PROCESS_IMG: u64 = ferry_protocol::image::MAX_PAYLOAD + (1 << 16);
/// Largest `pages.img` accepted.
pub const MAX_PAGES_IMG: u64 = 64 << 30;
/// Most threads a process may declare.
pub const MAX_TIDS: usize = 1 << 16;
/// Most mapped files a process may declare.
pub const MAX_FILES: usize = 1 << 16;
/// Longest path.
pub const MAX_PATH: usize = 4096;
/// Longest human-readable reason.
pub const MAX_REASON: usize = 4096;
/// Files up to this size are hashed for the identity check.
pub const MAX_HASHED: u64 = 256 << 20;

/// What the source knows about a file the process uses (its executable or a
/// mapped file), as seen through the process's own mapping.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileFact {
    /// Absolute path.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: i64,
    /// xxh3-64 of the contents, for files up to [`MAX_HASHED`] bytes.
    pub hash: Option<u64>,
}

/// A control message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Msg {
    /// Source → destination, first message.
    Hello { version: u32, host: HostInfo },
    /// Destination → source: the host is compatible.
    HelloAck { version: u32, host: HostInfo },
    /// Destination → source: no, and why; the destination closes.
    Refuse { reason: String },
    /// Source → destination: what must be free and identical there.
    Prepare {
        pid: i32,
        tids: Vec<i32>,
        exe: FileFact,
        files: Vec<FileFact>,
    },
    /// Destination → source: everything checked, send the image.
    Ready,
    /// Source → destination: the image files follow on the stream, raw.
    Image { process_len: u64, pages_len: u64 },
    /// Destination → source: the process runs there.
    Running { pid: i32, restore_ms: f64 },
    /// Destination → source: the restore failed (nothing is left running).
    Failed { reason: String },
    /// Source → destination: the source copy is being killed.
    Done,
    /// Either side: giving up before `Running`.
    Abort { reason: String },
}

fn check_text(what: &str, s: &str, max: usize) -> Result<()> {
    if s.len() > max {
        bail!("{what} is {} bytes long (at most {max})", s.len());
    }
    Ok(())
}

fn check_fact(f: &FileFact) -> Result<()> {
    check_text("a file path", &f.path, MAX_PATH)?;
    if !f.path.starts_with('/') || f.path.contains('\0') {
        bail!("file path {:?} is not an absolute path", f.path);
    }
    Ok(())
}

impl Msg {
    /// Short name for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Msg::Hello { .. } => "Hello",
            Msg::HelloAck { .. } => "HelloAck",
            Msg::Refuse { .. } => "Refuse",
            Msg::Prepare { .. } => "Prepare",
            Msg::Ready => "Ready",
            Msg::Image { .. } => "Image",
            Msg::Running { .. } => "Running",
            Msg::Failed { .. } => "Failed",
            Msg::Done => "Done",
            Msg::Abort { .. } => "Abort",
        }
    }

    /// Check the bounds and consistency of a received message.
    pub fn validate(&self) -> Result<()> {
        match self {
            Msg::Hello { host, .. } | Msg::HelloAck { host, .. } => {
                check_text("the architecture", &host.arch, 256)?;
                check_text("the kernel release", &host.kernel, 256)?;
            }
            Msg::Refuse { reason } | Msg::Failed { reason } | Msg::Abort { reason } => {
                check_text("the reason", reason, MAX_REASON)?;
            }
            Msg::Prepare {
                pid,
                tids,
                exe,
                files,
            } => {
                if *pid <= 0 {
                    bail!("invalid PID {pid}");
                }
                if tids.is_empty() || tids.len() > MAX_TIDS {
                    bail!("{} thread ids (1 to {MAX_TIDS} expected)", tids.len());
                }
                if tids[0] != *pid {
                    bail!("the first thread id {} is not the PID {pid}", tids[0]);
                }
                let mut seen = std::collections::HashSet::new();
                for &t in tids {
                    if t <= 0 || !seen.insert(t) {
                        bail!("invalid or repeated thread id {t}");
                    }
                }
                if files.len() > MAX_FILES {
                    bail!("{} mapped files (at most {MAX_FILES})", files.len());
                }
                check_fact(exe)?;
                for f in files {
                    check_fact(f)?;
                }
            }
            Msg::Image {
                process_len,
                pages_len,
            } => {
                if *process_len == 0 || *process_len > MAX_PROCESS_IMG {
                    bail!("process image of {process_len} bytes (1 to {MAX_PROCESS_IMG})");
                }
                if *pages_len == 0 || *pages_len > MAX_PAGES_IMG {
                    bail!("page store of {pages_len} bytes (1 to {MAX_PAGES_IMG})");
                }
            }
            Msg::Running { pid, restore_ms } => {
                if *pid <= 0 || !restore_ms.is_finite() || *restore_ms < 0.0 {
                    bail!("invalid Running {{pid: {pid}, restore_ms: {restore_ms}}}");
                }
            }
            Msg::Ready | Msg::Done => {}
        }
        Ok(())
    }
}

/// Write one framed message; returns the bytes written.
pub async fn send(w: &mut (impl AsyncWrite + Unpin), msg: &Msg) -> Result<u64> {
    let payload = postcard::to_allocvec(msg).context("encoding a message")?;
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|&l| l <= MAX_MSG)
        .with_context(|| format!("{} message too large", msg.name()))?;
    let mut frame = Vec::with_capacity(4 + payload.len());
    frame.extend_from_slice(&len.to_le_bytes());
    frame.extend_from_slice(&payload);
    w.write_all(&frame)
        .await
        .with_context(|| format!("sending {}", msg.name()))?;
    Ok(frame.len() as u64)
}

/// Read one framed message and validate it.
pub async fn recv(r: &mut (impl AsyncRead + Unpin)) -> Result<Msg> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)
        .await
        .context("reading a message header")?;
    let len = u32::from_le_bytes(len);
    if len > MAX_MSG {
        bail!("message of {len} bytes (at most {MAX_MSG})");
    }
    let mut payload = vec![0u8; len as usize];
    r.read_exact(&mut payload)
        .await
        .context("reading a message")?;
    let msg: Msg = postcard::from_bytes(&payload).context("malformed message")?;
    msg.validate()
        .with_context(|| format!("invalid {} message", msg.name()))?;
    Ok(msg)
}

/// Facts of the file at `open` (which may be a /proc magic link to the
/// mapped inode), reported under the name `path`.
pub fn file_fact(open: &Path, path: &str) -> std::io::Result<FileFact> {
    let meta = std::fs::metadata(open)?;
    let hash = if meta.is_file() && meta.size() <= MAX_HASHED {
        Some(hash_file(open)?)
    } else {
        None
    };
    Ok(FileFact {
        path: path.to_string(),
        size: meta.size(),
        mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
        hash,
    })
}

fn hash_file(p: &Path) -> std::io::Result<u64> {
    let mut f = std::fs::File::open(p)?;
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.digest())
}

/// Why the local file `want.path` is not the one the source uses, if so.
pub fn file_mismatch(want: &FileFact) -> Option<String> {
    let here = match std::fs::symlink_metadata(&want.path)
        .and_then(|_| file_fact(Path::new(&want.path), &want.path))
    {
        Ok(f) => f,
        Err(e) => return Some(format!("{} is missing on the destination: {e}", want.path)),
    };
    if here.size != want.size {
        return Some(format!(
            "{} differs on the destination: size {} here, {} on the source",
            want.path, here.size, want.size
        ));
    }
    if let (Some(a), Some(b)) = (here.hash, want.hash) {
        if a != b {
            return Some(format!(
                "{} differs on the destination: its content is not the same",
                want.path
            ));
        }
    }
    if here.mtime_ns != want.mtime_ns {
        return Some(format!(
            "{} differs on the destination: modification time {} here, {} on the source",
            want.path, here.mtime_ns, want.mtime_ns
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> HostInfo {
        HostInfo {
            arch: "x86_64".into(),
            kernel: "6.1".into(),
            xstate_size: 832,
            xfeatures: 7,
        }
    }

    fn fact(path: &str) -> FileFact {
        FileFact {
            path: path.into(),
            size: 1,
            mtime_ns: 2,
            hash: Some(3),
        }
    }

    #[tokio::test]
    async fn round_trip() {
        let msgs = vec![
            Msg::Hello {
                version: VERSION,
                host: host(),
            },
            Msg::Prepare {
                pid: 10,
                tids: vec![10, 11],
                exe: fact("/bin/x"),
                files: vec![fact("/lib/y")],
            },
            Msg::Ready,
            Msg::Image {
                process_len: 5,
                pages_len: 6,
            },
            Msg::Running {
                pid: 10,
                restore_ms: 1.5,
            },
            Msg::Done,
        ];
        let mut buf = Vec::new();
        for m in &msgs {
            send(&mut buf, m).await.unwrap();
        }
        let mut r = &buf[..];
        for m in &msgs {
            assert_eq!(&recv(&mut r).await.unwrap(), m);
        }
        assert!(recv(&mut r).await.is_err());
    }

    #[tokio::test]
    async fn rejects_bad_input() {
        // Oversized length.
        let mut r = &(MAX_MSG + 1).to_le_bytes()[..];
        assert!(recv(&mut r).await.is_err());
        // Garbage payload.
        let mut frame = 3u32.to_le_bytes().to_vec();
        frame.extend_from_slice(&[0xff, 0xff, 0xff]);
        assert!(recv(&mut &frame[..]).await.is_err());
        // Truncated.
        let mut buf = Vec::new();
        send(&mut buf, &Msg::Done).await.unwrap();
        buf.push(0);
        buf[0] += 1;
        buf.truncate(buf.len() - 1);
        assert!(recv(&mut &buf[..]).await.is_err());
        // Invalid contents.
        for m in [
            Msg::Prepare {
                pid: 10,
                tids: vec![11, 10],
                exe: fact("/bin/x"),
                files: vec![],
            },
            Msg::Prepare {
                pid: 10,
                tids: vec![10, 10],
                exe: fact("/bin/x"),
                files: vec![],
            },
            Msg::Prepare {
                pid: 10,
                tids: vec![10],
                exe: fact("relative"),
                files: vec![],
            },
            Msg::Image {
                process_len: MAX_PROCESS_IMG + 1,
                pages_len: 1,
            },
            Msg::Refuse {
                reason: "x".repeat(MAX_REASON + 1),
            },
        ] {
            let mut buf = Vec::new();
            send(&mut buf, &m).await.unwrap();
            assert!(recv(&mut &buf[..]).await.is_err(), "{m:?} accepted");
        }
    }

    #[test]
    fn file_identity() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"hello").unwrap();
        let ps = p.to_str().unwrap();
        let f = file_fact(&p, ps).unwrap();
        assert_eq!(f.size, 5);
        assert_eq!(file_mismatch(&f), None);
        let mut other = f.clone();
        other.hash = Some(f.hash.unwrap() ^ 1);
        assert!(file_mismatch(&other).unwrap().contains("content"));
        other = f.clone();
        other.size = 6;
        assert!(file_mismatch(&other).unwrap().contains("size"));
        other = f.clone();
        other.path = format!("{ps}.missing");
        assert!(file_mismatch(&other).unwrap().contains("missing"));
    }
}
