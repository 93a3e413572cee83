//! rustls configurations with pinned-fingerprint mutual authentication.
//!
//! The verifiers here replace certificate-chain validation by one question:
//! is the SHA-256 fingerprint of the peer's end-entity certificate in the
//! [`TrustStore`]? Names, issuers and validity dates are ignored. The
//! handshake signatures (proof that the peer holds the certificate's key)
//! are still checked by rustls with the *ring* provider's algorithms.
//! Session resumption is disabled so that every connection is checked
//! against the current trust store.

use std::fmt;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme};

use crate::identity::{Fingerprint, Identity};
use crate::trust::TrustStore;
use crate::Result;

/// The ALPN protocol name of ferry's wire protocol, version 1.
pub const ALPN: &[u8] = b"ferry/1";

/// The TLS server name clients ask for. Certificates are pinned by
/// fingerprint, so the name carries no meaning.
pub const SERVER_NAME: &str = "ferry";

/// Default trust hint for a server refusing a client (run on the destination).
pub const DEST_TRUST_HINT: &str = "dest-agent trust";

/// Default trust hint for a client refusing a server (run on the source).
pub const SOURCE_TRUST_HINT: &str = "migrate trust";

/// The rustls crypto provider ferry uses everywhere (*ring*).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The error a verifier returns for a peer whose fingerprint is not trusted.
///
/// Its text (also sent to the peer as the QUIC close reason) names the
/// refused fingerprint and the command that would trust it.
#[derive(Debug, Clone)]
pub struct UntrustedPeer {
    /// The fingerprint of the refused certificate.
    pub fingerprint: Fingerprint,
    /// `"client"` or `"server"`: the role of the refused peer.
    pub peer_role: &'static str,
    /// The command prefix that trusts a peer on the refusing side.
    pub hint: String,
}

impl fmt::Display for UntrustedPeer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let refuser = if self.peer_role == "client" {
            "server"
        } else {
            "client"
        };
        write!(
            f,
            "{role} {fp} is not a trusted peer of the {refuser}; if it is the expected host, run `{hint} {fp}` on the {refuser}",
            role = self.peer_role,
            fp = self.fingerprint,
            hint = self.hint,
        )
    }
}

impl std::error::Error for UntrustedPeer {}

/// The fingerprint check shared by both verifiers.
#[derive(Debug, Clone)]
struct Pinning {
    trust: TrustStore,
    hint: String,
    algorithms: WebPkiSupportedAlgorithms,
}

impl Pinning {
    fn new(trust: TrustStore, hint: &str) -> Self {
        Pinning {
            trust,
            hint: hint.to_string(),
            algorithms: rustls::crypto::ring::default_provider().signature_verification_algorithms,
        }
    }

    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        peer_role: &'static str,
    ) -> Result<(), rustls::Error> {
        let fingerprint = Fingerprint::of_der(end_entity);
        if self.trust.contains_fresh(&fingerprint) {
            tracing::debug!(%fingerprint, peer_role, "trusted peer");
            return Ok(());
        }
        let refusal = UntrustedPeer {
            fingerprint,
            peer_role,
            hint: self.hint.clone(),
        };
        tracing::warn!("refused: {refusal}");
        // `Error::Other` keeps our text intact in the error's `Display`,
        // which quinn also sends to the peer as the close reason.
        Err(rustls::Error::Other(OtherError(Arc::new(refusal))))
    }

    fn tls12(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn tls13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Client-side verifier of the server's certificate: accepts it only if its
/// fingerprint is trusted.
#[derive(Debug, Clone)]
pub struct PinnedServerVerifier(Pinning);

impl PinnedServerVerifier {
    /// A verifier trusting the servers in `trust`; `hint` is the command a
    /// user runs on this (client) side to trust a server, e.g.
    /// [`SOURCE_TRUST_HINT`].
    pub fn new(trust: TrustStore, hint: &str) -> Self {
        PinnedServerVerifier(Pinning::new(trust, hint))
    }
}

impl ServerCertVerifier for PinnedServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.0.check(end_entity, "server")?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.schemes()
    }
}

/// Server-side verifier of the client's certificate: a certificate is
/// mandatory, and accepted only if its fingerprint is trusted.
#[derive(Debug, Clone)]
pub struct PinnedClientVerifier(Pinning);

impl PinnedClientVerifier {
    /// A verifier trusting the clients in `trust`; `hint` is the command a
    /// user runs on this (server) side to trust a client, e.g.
    /// [`DEST_TRUST_HINT`].
    pub fn new(trust: TrustStore, hint: &str) -> Self {
        PinnedClientVerifier(Pinning::new(trust, hint))
    }
}

impl ClientCertVerifier for PinnedClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.0.check(end_entity, "client")?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.schemes()
    }
}

/// A TLS 1.3 server configuration presenting `id`, requiring a client
/// certificate whose fingerprint is in `trust`, speaking ALPN [`ALPN`].
/// `hint` is the command that trusts a client on this side.
pub fn server_config(id: &Identity, trust: TrustStore, hint: &str) -> Result<rustls::ServerConfig> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(PinnedClientVerifier::new(trust, hint)))
        .with_single_cert(vec![id.certificate().clone()], id.private_key())?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    // No resumption: every connection is checked against the trust store.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// A TLS 1.3 client configuration presenting `id`, accepting only a server
/// whose fingerprint is in `trust`, speaking ALPN [`ALPN`]. `hint` is the
/// command that trusts a server on this side.
pub fn client_config(id: &Identity, trust: TrustStore, hint: &str) -> Result<rustls::ClientConfig> {
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedServerVerifier::new(trust, hint)))
        .with_client_auth_cert(vec![id.certificate().clone()], id.private_key())?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}
