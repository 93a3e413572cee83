//! Errors of the parasite crate.

use std::io;

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// What went wrong while controlling a foreign process.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A system call or ptrace request failed.
    #[error("{what} on {tid} failed: {source}")]
    Sys {
        what: String,
        tid: i32,
        #[source]
        source: io::Error,
    },
    /// The thread is traced by someone else already (EPERM on seize).
    #[error("thread {tid} is already traced by another process (or tracing it is not permitted)")]
    AlreadyTraced { tid: i32 },
    /// No such thread.
    #[error("no thread or process with id {tid}")]
    NoSuchThread { tid: i32 },
    /// The thread exited while we were controlling it.
    #[error("thread {tid} exited while being traced")]
    ThreadGone { tid: i32 },
    /// An injected system call returned an error.
    #[error("injected {name} in {tid} failed: {source}")]
    Remote {
        name: &'static str,
        tid: i32,
        #[source]
        source: io::Error,
    },
    /// The thread stopped in an unexpected way.
    #[error("thread {tid} stopped unexpectedly: {what}")]
    Unexpected { tid: i32, what: String },
}

impl Error {
    /// A failed request `what` on `tid`.
    pub fn sys(what: &str, tid: i32, source: io::Error) -> Self {
        Error::Sys {
            what: what.to_string(),
            tid,
            source,
        }
    }
}
