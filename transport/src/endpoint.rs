//! QUIC endpoints with pinned mutual TLS and a transport configuration tuned
//! for bulk transfers.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{
    Connection, Endpoint, EndpointConfig, IdleTimeout, TokioRuntime, TransportConfig, VarInt,
};
use rustls::pki_types::CertificateDer;
use socket2::{Domain, Protocol, Socket, Type};

use crate::identity::{Fingerprint, Identity};
use crate::tls::{self, DEST_TRUST_HINT, SERVER_NAME, SOURCE_TRUST_HINT};
use crate::trust::TrustStore;
use crate::{Error, Result};

/// The UDP port a destination agent listens on when none is given.
pub const DEFAULT_PORT: u16 = 7420;

/// Tunables of an endpoint. [`Default`] gives the values ferry uses.
#[derive(Debug, Clone)]
pub struct EndpointOptions {
    /// Close a connection after this long without hearing from the peer
    /// (default 10 s).
    pub idle_timeout: Duration,
    /// Send a keep-alive after this long without sending (default 1 s), so
    /// a live but quiet connection never hits the idle timeout and a dead
    /// peer is noticed quickly.
    pub keep_alive: Duration,
    /// Flow-control window of each stream in bytes (default 16 MiB).
    pub stream_window: u64,
    /// Flow-control window of the whole connection in bytes, both for
    /// receiving and sending (default 64 MiB).
    pub connection_window: u64,
    /// How many unidirectional streams the peer may have open at once
    /// (default 64: page data travels on several in parallel).
    pub max_uni_streams: u32,
    /// How many bidirectional streams the peer may have open at once
    /// (default 16).
    pub max_bidi_streams: u32,
    /// Requested UDP send and receive buffer size in bytes (default 8 MiB);
    /// the kernel may grant less (`net.core.rmem_max`), which is not an
    /// error.
    pub socket_buffer: usize,
    /// The command a user runs on this side to trust a peer, quoted in
    /// refusals. `None`: `dest-agent trust` for servers, `migrate trust` for
    /// clients.
    pub trust_hint: Option<String>,
    /// Local address of a client endpoint. `None`: `[::]:0` (dual stack),
    /// or `0.0.0.0:0` where IPv6 is unavailable.
    pub client_bind: Option<SocketAddr>,
}

impl Default for EndpointOptions {
    fn default() -> Self {
        EndpointOptions {
            idle_timeout: Duration::from_secs(10),
            keep_alive: Duration::from_secs(1),
            stream_window: 16 << 20,
            connection_window: 64 << 20,
            max_uni_streams: 64,
            max_bidi_streams: 16,
            socket_buffer: 8 << 20,
            trust_hint: None,
            client_bind: None,
        }
    }
}

impl EndpointOptions {
    /// The quinn transport configuration these options describe.
    pub fn transport_config(&self) -> Result<TransportConfig> {
        let varint = |what: &str, v: u64| {
            VarInt::from_u64(v).map_err(|_| Error::Config(format!("{what} {v} is too large")))
        };
        let idle = IdleTimeout::try_from(self.idle_timeout).map_err(|_| {
            Error::Config(format!("idle timeout {:?} is too large", self.idle_timeout))
        })?;
        let mut t = TransportConfig::default();
        t.max_idle_timeout(Some(idle))
            .keep_alive_interval(Some(self.keep_alive))
            .stream_receive_window(varint("stream window", self.stream_window)?)
            .receive_window(varint("connection window", self.connection_window)?)
            .send_window(self.connection_window)
            .max_concurrent_uni_streams(self.max_uni_streams.into())
            .max_concurrent_bidi_streams(self.max_bidi_streams.into());
        Ok(t)
    }
}

/// A server endpoint on `addr` with [`EndpointOptions::default`].
pub fn server_endpoint(addr: SocketAddr, id: &Identity, trust: TrustStore) -> Result<Endpoint> {
    server_endpoint_with(addr, id, trust, &EndpointOptions::default())
}

/// A server endpoint on `addr` presenting `id` and accepting only clients
/// whose fingerprint is in `trust`. Must be called inside a tokio runtime.
pub fn server_endpoint_with(
    addr: SocketAddr,
    id: &Identity,
    trust: TrustStore,
    opts: &EndpointOptions,
) -> Result<Endpoint> {
    require_runtime()?;
    let hint = opts.trust_hint.as_deref().unwrap_or(DEST_TRUST_HINT);
    let crypto = QuicServerConfig::try_from(tls::server_config(id, trust, hint)?)
        .map_err(|e| Error::Config(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(opts.transport_config()?));
    let socket = bind_udp(addr, opts.socket_buffer)?;
    Endpoint::new(
        EndpointConfig::default(),
        Some(config),
        socket,
        Arc::new(TokioRuntime),
    )
    .map_err(|source| Error::Socket { addr, source })
}

/// A client endpoint with [`EndpointOptions::default`].
pub fn client_endpoint(id: &Identity, trust: TrustStore) -> Result<Endpoint> {
    client_endpoint_with(id, trust, &EndpointOptions::default())
}

/// A client endpoint presenting `id` and accepting only servers whose
/// fingerprint is in `trust`. Must be called inside a tokio runtime.
pub fn client_endpoint_with(
    id: &Identity,
    trust: TrustStore,
    opts: &EndpointOptions,
) -> Result<Endpoint> {
    require_runtime()?;
    let hint = opts.trust_hint.as_deref().unwrap_or(SOURCE_TRUST_HINT);
    let crypto = QuicClientConfig::try_from(tls::client_config(id, trust, hint)?)
        .map_err(|e| Error::Config(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(opts.transport_config()?));
    let socket = match opts.client_bind {
        Some(addr) => bind_udp(addr, opts.socket_buffer)?,
        None => bind_udp((Ipv6Addr::UNSPECIFIED, 0).into(), opts.socket_buffer)
            .or_else(|_| bind_udp((Ipv4Addr::UNSPECIFIED, 0).into(), opts.socket_buffer))?,
    };
    let local = socket
        .local_addr()
        .unwrap_or_else(|_| (Ipv4Addr::UNSPECIFIED, 0).into());
    let mut endpoint = Endpoint::new(
        EndpointConfig::default(),
        None,
        socket,
        Arc::new(TokioRuntime),
    )
    .map_err(|source| Error::Socket {
        addr: local,
        source,
    })?;
    endpoint.set_default_client_config(config);
    Ok(endpoint)
}

/// Connects to the server at `addr` and completes the handshake.
///
/// A server that is not trusted makes this fail with a message naming its
/// fingerprint. A server that does not trust *us* may only be noticed after
/// this returns (TLS 1.3 lets the client finish first): the connection then
/// closes with the server's reason, which names our fingerprint.
pub async fn connect(ep: &Endpoint, addr: SocketAddr) -> Result<Connection> {
    ep.connect(addr, SERVER_NAME)
        .map_err(|source| Error::Connect { addr, source })?
        .await
        .map_err(|source| Error::Connection { addr, source })
}

/// Waits for the next incoming connection and completes its handshake.
/// `None` once the endpoint is closed. A refused or failed handshake is an
/// `Err` for that connection only; keep accepting.
pub async fn accept(ep: &Endpoint) -> Option<Result<Connection>> {
    let incoming = ep.accept().await?;
    let addr = incoming.remote_address();
    Some(
        incoming
            .await
            .map_err(|source| Error::Connection { addr, source }),
    )
}

/// Why `conn` closed, as an [`Error`] whose text carries the reason the
/// peer gave (for instance a refusal naming our fingerprint); `None` while
/// the connection is open. Stream errors only say "connection lost": use
/// this to explain them.
pub fn close_error(conn: &Connection) -> Option<Error> {
    conn.close_reason().map(|source| Error::Connection {
        addr: conn.remote_address(),
        source,
    })
}

/// The fingerprint of the certificate the peer of `conn` presented.
pub fn peer_fingerprint(conn: &Connection) -> Option<Fingerprint> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    certs.first().map(|c| Fingerprint::of_der(c))
}

fn require_runtime() -> Result<()> {
    tokio::runtime::Handle::try_current()
        .map(|_| ())
        .map_err(|_| Error::NoRuntime)
}

/// A non-blocking UDP socket bound to `addr` with (best effort) `buffer`
/// bytes of send and receive buffer.
fn bind_udp(addr: SocketAddr, buffer: usize) -> Result<std::net::UdpSocket> {
    let err = |source| Error::Socket { addr, source };
    let socket =
        Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP)).map_err(err)?;
    if addr.is_ipv6() && addr.ip().is_unspecified() {
        // Dual stack, so an unspecified v6 address also serves IPv4 peers.
        let _ = socket.set_only_v6(false);
    }
    if let Err(e) = socket.set_recv_buffer_size(buffer) {
        tracing::debug!("cannot set UDP receive buffer to {buffer}: {e}");
    }
    if let Err(e) = socket.set_send_buffer_size(buffer) {
        tracing::debug!("cannot set UDP send buffer to {buffer}: {e}");
    }
    tracing::debug!(
        recv = socket.recv_buffer_size().ok(),
        send = socket.send_buffer_size().ok(),
        "UDP socket buffers"
    );
    socket.bind(&addr.into()).map_err(err)?;
    socket.set_nonblocking(true).map_err(err)?;
    Ok(socket.into())
}
