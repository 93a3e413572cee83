//! This side's identity: a key pair and a self-signed certificate kept in
//! the configuration directory, named by the certificate's fingerprint.

use std::fmt;
use std::fs::{self, DirBuilder};
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sha2::{Digest, Sha256};

use crate::{files, io_err, Error, Result};

/// Configuration directory used when neither `--config-dir` nor
/// `FERRY_CONFIG_DIR` says otherwise.
pub const DEFAULT_CONFIG_DIR: &str = "/etc/ferry";

/// Environment variable that overrides [`DEFAULT_CONFIG_DIR`].
pub const CONFIG_DIR_ENV: &str = "FERRY_CONFIG_DIR";

/// File name of the private key (PKCS#8 PEM, mode 0600) in the config dir.
pub const KEY_FILE: &str = "key.pem";

/// File name of the self-signed certificate (PEM) in the config dir.
pub const CERT_FILE: &str = "cert.pem";

/// Prefix of every fingerprint.
const FP_PREFIX: &str = "sha256:";

/// The configuration directory: `$FERRY_CONFIG_DIR` if set and not empty,
/// otherwise [`DEFAULT_CONFIG_DIR`].
pub fn default_config_dir() -> PathBuf {
    match std::env::var_os(CONFIG_DIR_ENV) {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => PathBuf::from(DEFAULT_CONFIG_DIR),
    }
}

/// The name of a ferry host: `sha256:` followed by the 64 lowercase hex
/// digits of the SHA-256 digest of its DER-encoded certificate.
///
/// Parsing ([`FromStr`]) accepts upper- or lowercase hex and surrounding
/// white space, and normalizes to lowercase.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Fingerprint(String);

impl Fingerprint {
    /// The fingerprint of a DER-encoded certificate.
    pub fn of_der(der: &[u8]) -> Fingerprint {
        let digest = Sha256::digest(der);
        let mut s = String::with_capacity(FP_PREFIX.len() + 64);
        s.push_str(FP_PREFIX);
        for b in digest {
            s.push_str(&format!("{b:02x}"));
        }
        Fingerprint(s)
    }

    /// The canonical text form, e.g. `sha256:3f2a…`.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Fingerprint {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let t = s.trim();
        let invalid = || Error::InvalidFingerprint {
            input: t.chars().take(100).collect(),
        };
        let hex = t
            .get(..FP_PREFIX.len())
            .filter(|p| p.eq_ignore_ascii_case(FP_PREFIX))
            .and_then(|_| t.get(FP_PREFIX.len()..))
            .ok_or_else(invalid)?;
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(invalid());
        }
        Ok(Fingerprint(format!(
            "{FP_PREFIX}{}",
            hex.to_ascii_lowercase()
        )))
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({})", self.0)
    }
}

impl AsRef<str> for Fingerprint {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// This side's key pair and self-signed certificate.
///
/// The private key never appears in `Debug` output.
pub struct Identity {
    dir: PathBuf,
    cert: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
    fingerprint: Fingerprint,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity {
            dir: self.dir.clone(),
            cert: self.cert.clone(),
            key: self.key.clone_key(),
            fingerprint: self.fingerprint.clone(),
        }
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("dir", &self.dir)
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// Loads the identity from `config_dir`, creating it on first use.
    ///
    /// Creates `config_dir` (mode 0700) if needed, then a new ECDSA P-256 key
    /// (`key.pem`, mode 0600) and a self-signed certificate (`cert.pem`) if
    /// the key does not exist. If only the certificate is missing it is made
    /// again from the existing key (the fingerprint then changes). Files
    /// appear complete or not at all, and concurrent first uses agree on one
    /// identity. Refuses a key readable or writable by group or others, a
    /// certificate without its key, and a certificate that does not belong
    /// to the key.
    pub fn load_or_create(config_dir: &Path) -> Result<Identity> {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(config_dir)
            .map_err(io_err(config_dir))?;
        let key_path = config_dir.join(KEY_FILE);
        let cert_path = config_dir.join(CERT_FILE);

        let key_exists = exists(&key_path)?;
        if !key_exists {
            if exists(&cert_path)? {
                return Err(Error::BadIdentity {
                    path: cert_path,
                    reason: format!(
                        "certificate exists but its key {} is missing; remove the certificate to create a new identity",
                        key_path.display()
                    ),
                });
            }
            let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
            if files::create_if_absent(&key_path, key.serialize_pem().as_bytes(), 0o600)? {
                tracing::info!(path = %key_path.display(), "created a new private key");
            }
        }

        let key_pem = read_key(&key_path)?;
        if !exists(&cert_path)? {
            let key_pair = rcgen::KeyPair::from_pem(&key_pem).map_err(|e| Error::BadIdentity {
                path: key_path.clone(),
                reason: format!("cannot parse private key: {e}"),
            })?;
            let mut params = rcgen::CertificateParams::new(vec!["ferry".to_string()])?;
            params.distinguished_name = rcgen::DistinguishedName::new();
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, "ferry");
            let cert = params.self_signed(&key_pair)?;
            if files::create_if_absent(&cert_path, cert.pem().as_bytes(), 0o644)? {
                tracing::info!(path = %cert_path.display(), "created a new self-signed certificate");
            }
        }
        let cert_pem = fs::read(&cert_path).map_err(io_err(&cert_path))?;

        let key = PrivatePkcs8KeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| {
            Error::BadIdentity {
                path: key_path.clone(),
                reason: format!("not a PKCS#8 PEM private key: {e}"),
            }
        })?;
        let cert = CertificateDer::from_pem_slice(&cert_pem).map_err(|e| Error::BadIdentity {
            path: cert_path.clone(),
            reason: format!("not a PEM certificate: {e}"),
        })?;
        check_key_matches(&cert, &key).map_err(|reason| Error::BadIdentity {
            path: cert_path.clone(),
            reason,
        })?;

        let fingerprint = Fingerprint::of_der(&cert);
        Ok(Identity {
            dir: config_dir.to_path_buf(),
            cert,
            key,
            fingerprint,
        })
    }

    /// This side's fingerprint (`sha256:` + 64 lowercase hex digits).
    pub fn fingerprint(&self) -> &Fingerprint {
        &self.fingerprint
    }

    /// The DER-encoded self-signed certificate.
    pub fn certificate(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// A copy of the private key, for building TLS configurations.
    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.clone_key())
    }

    /// The configuration directory this identity lives in.
    pub fn config_dir(&self) -> &Path {
        &self.dir
    }
}

fn exists(path: &Path) -> Result<bool> {
    match fs::symlink_metadata(path) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io_err(path)(e)),
    }
}

/// Reads the key file after checking that only its owner can access it.
fn read_key(path: &Path) -> Result<String> {
    let meta = fs::metadata(path).map_err(io_err(path))?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(Error::KeyPermissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    let bytes = fs::read(path).map_err(io_err(path))?;
    String::from_utf8(bytes).map_err(|_| Error::BadIdentity {
        path: path.to_path_buf(),
        reason: "not a PEM file (not UTF-8)".into(),
    })
}

/// Checks that `key` is the private key of `cert`.
fn check_key_matches(
    cert: &CertificateDer<'static>,
    key: &PrivatePkcs8KeyDer<'static>,
) -> std::result::Result<(), String> {
    let provider = rustls::crypto::ring::default_provider();
    let signing_key = provider
        .key_provider
        .load_private_key(PrivateKeyDer::Pkcs8(key.clone_key()))
        .map_err(|e| format!("unusable private key: {e}"))?;
    rustls::sign::CertifiedKey::new(vec![cert.clone()], Arc::clone(&signing_key))
        .keys_match()
        .map_err(|e| format!("certificate does not belong to the private key: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_format() {
        let fp = Fingerprint::of_der(b"hello");
        // sha256("hello")
        assert_eq!(
            fp.as_str(),
            "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        let upper = fp.as_str().to_uppercase();
        assert_eq!(upper.parse::<Fingerprint>().ok(), Some(fp.clone()));
        assert_eq!(format!("  {fp} \n").parse::<Fingerprint>().ok(), Some(fp));
        for bad in [
            "",
            "sha256:",
            "sha1:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824",
            "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b982",
            "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b98244",
            "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b982g",
            "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b98é",
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824",
        ] {
            assert!(bad.parse::<Fingerprint>().is_err(), "accepted {bad:?}");
        }
    }

    fn mode(p: &Path) -> u32 {
        fs::metadata(p)
            .map(|m| m.permissions().mode() & 0o777)
            .unwrap_or(0)
    }

    #[test]
    fn creates_then_reloads_same_identity() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("a/b");
        let id = Identity::load_or_create(&dir).expect("create");
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join(KEY_FILE)), 0o600);
        assert!(dir.join(CERT_FILE).exists());
        // The fingerprint is the SHA-256 of the DER inside cert.pem.
        let pem = fs::read(dir.join(CERT_FILE)).expect("read cert");
        let der = CertificateDer::from_pem_slice(&pem).expect("pem");
        assert_eq!(id.fingerprint(), &Fingerprint::of_der(&der));
        assert_eq!(id.certificate().as_ref(), der.as_ref());

        let again = Identity::load_or_create(&dir).expect("reload");
        assert_eq!(again.fingerprint(), id.fingerprint());
        // No temporary files left behind.
        let names: Vec<_> = fs::read_dir(&dir)
            .expect("read_dir")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        // Debug never shows the key.
        let dbg = format!("{id:?}");
        assert!(!dbg.contains("PRIVATE"), "{dbg}");
    }

    #[test]
    fn two_dirs_two_identities() {
        let a = tempfile::tempdir().expect("tempdir");
        let b = tempfile::tempdir().expect("tempdir");
        let ia = Identity::load_or_create(a.path()).expect("a");
        let ib = Identity::load_or_create(b.path()).expect("b");
        assert_ne!(ia.fingerprint(), ib.fingerprint());
    }

    #[test]
    fn refuses_loose_key_permissions() {
        let tmp = tempfile::tempdir().expect("tempdir");
        Identity::load_or_create(tmp.path()).expect("create");
        let key = tmp.path().join(KEY_FILE);
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).expect("chmod");
        let err = Identity::load_or_create(tmp.path()).expect_err("loose key accepted");
        assert!(
            matches!(err, Error::KeyPermissions { mode: 0o644, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("chmod 600"), "{err}");
    }

    #[test]
    fn regenerates_missing_cert_and_refuses_orphan_cert() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let first = Identity::load_or_create(tmp.path()).expect("create");
        fs::remove_file(tmp.path().join(CERT_FILE)).expect("rm cert");
        let second = Identity::load_or_create(tmp.path()).expect("recreate cert");
        assert_eq!(
            second.private_key().secret_der(),
            first.private_key().secret_der()
        );

        fs::remove_file(tmp.path().join(KEY_FILE)).expect("rm key");
        let err = Identity::load_or_create(tmp.path()).expect_err("orphan cert accepted");
        assert!(matches!(err, Error::BadIdentity { .. }), "{err}");
    }

    #[test]
    fn refuses_cert_of_another_key() {
        let a = tempfile::tempdir().expect("tempdir");
        let b = tempfile::tempdir().expect("tempdir");
        Identity::load_or_create(a.path()).expect("a");
        Identity::load_or_create(b.path()).expect("b");
        fs::copy(b.path().join(CERT_FILE), a.path().join(CERT_FILE)).expect("copy");
        let err = Identity::load_or_create(a.path()).expect_err("mismatch accepted");
        assert!(err.to_string().contains("does not belong"), "{err}");
    }
}
