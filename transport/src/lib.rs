//! ferry's transport: who we are, whom we trust, and the QUIC endpoints that
//! carry a migration between two hosts.
//!
//! # Pairing
//!
//! Trust works like SSH's known hosts, in both directions at once:
//!
//! * On first use each side creates a key pair and a self-signed certificate
//!   in its configuration directory ([`Identity::load_or_create`], by default
//!   [`default_config_dir`]: `$FERRY_CONFIG_DIR` or `/etc/ferry`). The
//!   certificate's [`Fingerprint`] (`sha256:` followed by 64 lowercase hex
//!   digits of the SHA-256 of the DER certificate) names that side.
//! * Each side keeps a list of the fingerprints it trusts in the file
//!   `trusted_peers` next to its key ([`TrustStore`]). Pairing two hosts means
//!   adding each one's fingerprint to the other's list (`migrate trust
//!   sha256:…` on the source, `dest-agent trust sha256:…` on the destination).
//! * Every connection is mutual TLS 1.3 over QUIC (ALPN [`tls::ALPN`]). The
//!   client must present a certificate; each side accepts the other only if
//!   the SHA-256 fingerprint of the presented certificate is in its trust
//!   store, and rustls checks that the peer really holds the matching private
//!   key. Names, issuers and validity dates are not used: the fingerprint *is*
//!   the identity.
//! * There is no mode that accepts any peer. A refused peer makes the
//!   handshake fail on both sides with a message that names the refused
//!   fingerprint and the command that would trust it.
//! * A running server that misses a fingerprint re-reads `trusted_peers`
//!   before refusing, so `dest-agent trust …` takes effect without a restart.
//!
//! # Endpoints
//!
//! [`server_endpoint`] and [`client_endpoint`] build quinn endpoints with a
//! transport configuration tuned for bulk memory transfer (large flow-control
//! windows, 1 s keep-alive, 10 s idle timeout by default, 8 MiB UDP socket
//! buffers where the kernel allows); [`connect`] and [`accept`] complete the
//! handshake. With TLS 1.3 the client finishes its handshake before the
//! server has checked the client's certificate, so a client the server
//! refuses may see [`connect`] succeed and then the first stream operation
//! fail with the server's reason.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod endpoint;
mod files;
pub mod frames;
pub mod identity;
pub mod tls;
pub mod trust;

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;

pub use endpoint::{
    accept, client_endpoint, client_endpoint_with, close_error, connect, peer_fingerprint,
    server_endpoint, server_endpoint_with, EndpointOptions, DEFAULT_PORT,
};
pub use identity::{default_config_dir, Fingerprint, Identity, DEFAULT_CONFIG_DIR};
pub use trust::TrustStore;

/// Everything that can go wrong in this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or directory operation failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The private key file can be read or written by group or others.
    #[error(
        "{}: private key is accessible by group or others (mode {mode:04o}); run `chmod 600 {}`",
        path.display(),
        path.display()
    )]
    KeyPermissions {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The identity files exist but cannot be used.
    #[error("{}: {reason}", path.display())]
    BadIdentity {
        /// The offending file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Generating a key pair or certificate failed.
    #[error("generating identity: {0}")]
    Generate(#[from] rcgen::Error),
    /// A string is not a fingerprint in ferry's format.
    #[error("invalid fingerprint {input:?}: expected `sha256:` followed by 64 hex digits")]
    InvalidFingerprint {
        /// The rejected input (truncated to 100 characters).
        input: String,
    },
    /// A line of the `trusted_peers` file cannot be parsed.
    #[error("{}:{line}: {reason}", path.display())]
    TrustFile {
        /// The trust file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong with the line.
        reason: String,
    },
    /// Building the TLS configuration failed.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// Building the QUIC configuration failed.
    #[error("QUIC configuration: {0}")]
    Config(String),
    /// Creating or binding the UDP socket failed.
    #[error("UDP socket {addr}: {source}")]
    Socket {
        /// The address we tried to bind.
        addr: SocketAddr,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// An endpoint was created outside a tokio runtime.
    #[error("QUIC endpoints must be created inside a tokio runtime")]
    NoRuntime,
    /// The connection attempt could not be started.
    #[error("connecting to {addr}: {source}")]
    Connect {
        /// The peer address.
        addr: SocketAddr,
        /// The underlying error.
        #[source]
        source: quinn::ConnectError,
    },
    /// The handshake or the connection failed (including a refused peer).
    #[error("connection with {addr} failed: {source}")]
    Connection {
        /// The peer address.
        addr: SocketAddr,
        /// The underlying error; its text carries the refusal reason.
        #[source]
        source: quinn::ConnectionError,
    },
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Shorthand for an [`Error::Io`] about `path`.
pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> Error {
    let path = path.into();
    move |source| Error::Io { path, source }
}
