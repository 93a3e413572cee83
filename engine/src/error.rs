//! Errors of the checkpoint/restore engine.

use std::io;

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// What went wrong during a checkpoint or a restore.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Controlling the process failed.
    #[error(transparent)]
    Parasite(#[from] ferry_parasite::Error),
    /// An I/O operation failed; `what` names it (and the path or PID).
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    /// The process does not exist.
    #[error("no process with PID {pid}")]
    NoSuchProcess { pid: i32 },
    /// An fd of a kind ferry cannot checkpoint yet.
    #[error("fd {fd} of process {pid} is {kind}, which ferry cannot checkpoint yet")]
    UnsupportedFd { pid: i32, fd: i32, kind: String },
    /// Some other state ferry cannot checkpoint yet (named in the message).
    #[error("process {pid}: {what} is not supported yet")]
    Unsupported { pid: i32, what: String },
    /// The image cannot be restored on this host (named in the message).
    #[error("cannot restore here: {0}")]
    Incompatible(String),
    /// The image could not be read.
    #[error(transparent)]
    Image(#[from] ferry_protocol::image::ImageError),
    /// The page store could not be read or written.
    #[error(transparent)]
    Pages(#[from] ferry_protocol::pages::PageError),
    /// Data read from /proc or an image did not have the expected form.
    #[error("unexpected {what}: {detail}")]
    Parse { what: String, detail: String },
    /// An image that someone other than root or the invoking user could
    /// have written (named in the message): restoring it as root would run
    /// what they put there.
    #[error("refusing to restore {path}: {why}")]
    UntrustedImage { path: String, why: String },
}

impl Error {
    /// An I/O error with context.
    pub fn io(what: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            what: what.into(),
            source,
        }
    }
    /// A parse error with context.
    pub fn parse(what: impl Into<String>, detail: impl Into<String>) -> Self {
        Error::Parse {
            what: what.into(),
            detail: detail.into(),
        }
    }
}
