//! TLS for both sides: the server config clients see, and the client configs used to reach
//! upstreams and the directory. One crypto provider (aws-lc-rs) everywhere. The mail
//! connections themselves run on [`stream`].

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{ClientConfig, DistinguishedName, RootCertStore, ServerConfig};

use serde::Deserialize;

pub mod stream;

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate or key file is missing, unreadable or not PEM.
    #[error("{what} {path}: {message}")]
    File {
        /// "certificate", "private key", "CA file", "client CA" or "client CRL".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What went wrong and what to do.
        message: String,
    },
    /// rustls refused the combination (e.g. the key does not match the certificate).
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// A self-signed certificate could not be generated.
    #[error("generating a self-signed certificate: {0}")]
    Generate(String),
    /// The private key file is not private (or not readable): the rule of every secret file.
    #[error("private key {0}")]
    KeyFile(#[from] crate::secret::SecretFileError),
}

/// The one crypto provider (aws-lc-rs).
pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The provider toward upstreams: X25519 and AES-128-GCM first. Every login is a handshake
/// there and every relayed byte is encrypted there, and these are the cheapest choices an
/// upstream is sure to support; the others stay offered after them.
fn upstream_provider() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::NamedGroup;
    let mut provider = aes128_first();
    provider.kx_groups.sort_by_key(|g| g.name() != NamedGroup::X25519);
    Arc::new(provider)
}

/// The provider with the AES-128-GCM suites first (TLS 1.3, then 1.2), the rest in their
/// order: the cheapest suites per byte and per handshake (SHA-256 runs on the CPU's SHA
/// instructions, SHA-384 does not), with no security margin a mail session needs given up.
fn aes128_first() -> rustls::crypto::CryptoProvider {
    use rustls::CipherSuite;
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider.cipher_suites.sort_by_key(|s| {
        !matches!(
            s.suite(),
            CipherSuite::TLS13_AES_128_GCM_SHA256
                | CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
                | CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
        )
    });
    provider
}

static TLS13_ONLY: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];

/// Lowest TLS version accepted from clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
pub enum TlsVersion {
    /// TLS 1.2 and 1.3.
    #[serde(rename = "1.2")]
    #[default]
    Tls12,
    /// TLS 1.3 only.
    #[serde(rename = "1.3")]
    Tls13,
}

fn versions(min: TlsVersion) -> &'static [&'static rustls::SupportedProtocolVersion] {
    match min {
        TlsVersion::Tls12 => rustls::DEFAULT_VERSIONS,
        TlsVersion::Tls13 => TLS13_ONLY,
    }
}

/// Loads every certificate in the PEM file at `path`.
pub fn load_certs(path: &Path, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let file_error = |message: String| TlsError::File { what, path: path.to_owned(), message };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(e.to_string()))?;
    if certs.is_empty() {
        return Err(file_error("contains no PEM certificate".to_owned()));
    }
    Ok(certs)
}

/// Refuses a leaf certificate outside its validity period, naming the dates; warns when it
/// expires within two weeks.
fn check_validity(leaf: &CertificateDer<'_>, path: &Path) -> Result<(), TlsError> {
    let file_error = |message: String| TlsError::File { what: "certificate", path: path.to_owned(), message };
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map_err(|e| file_error(format!("cannot parse the first certificate: {e}")))?;
    let validity = parsed.validity();
    let now = x509_parser::time::ASN1Time::now();
    if now < validity.not_before {
        return Err(file_error(format!(
            "not valid before {}; check the clock or the certificate",
            validity.not_before
        )));
    }
    if now > validity.not_after {
        return Err(file_error(format!("expired on {}; install a renewed certificate", validity.not_after)));
    }
    if validity.not_after.timestamp() - now.timestamp() < 14 * 24 * 3600 {
        tracing::warn!(cert = %path.display(), expires = %validity.not_after, "the TLS certificate expires within two weeks");
    }
    Ok(())
}

/// Loads the certificate revocation lists in `path`: PEM (one or more `X509 CRL` blocks) or
/// one DER CRL.
pub fn load_crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    let file_error = |message: String| TlsError::File { what: "client CRL", path: path.to_owned(), message };
    let bytes = std::fs::read(path).map_err(|e| file_error(e.to_string()))?;
    if bytes.trim_ascii_start().starts_with(b"-----BEGIN") {
        let crls = CertificateRevocationListDer::pem_slice_iter(&bytes)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| file_error(e.to_string()))?;
        if crls.is_empty() {
            return Err(file_error("contains no PEM `X509 CRL` block".to_owned()));
        }
        Ok(crls)
    } else if bytes.first() == Some(&0x30) {
        Ok(vec![CertificateRevocationListDer::from(bytes)])
    } else {
        Err(file_error("is neither a PEM nor a DER CRL".to_owned()))
    }
}

/// Asks clients for a certificate issued by one of `hints`' subjects without requiring one,
/// and accepts whatever chain comes: only the handshake signature is checked here (the
/// client holds the certificate's key). The chain, validity and revocation are judged after
/// the handshake by the access decision (`crate::access::certificate`), so a refusal can
/// say why and clients without a certificate still connect.
#[derive(Debug)]
struct RequestClientCertificate {
    hints: Vec<DistinguishedName>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ClientCertVerifier for RequestClientCertificate {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.hints
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// Builds the server config clients see, from a PEM chain and key. The leaf must be within
/// its validity period and match the key. With `client_ca_subjects` (the subjects of
/// `[tls] client_ca`), clients are asked for a certificate but may connect without one.
pub fn server_config(
    cert: &Path,
    key: &Path,
    min: TlsVersion,
    client_ca_subjects: Option<Vec<DistinguishedName>>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = load_certs(cert, "certificate")?;
    check_validity(&chain[0], cert)?;
    // The key is a secret file like any other: owner-only, read through the one reader.
    let pem = crate::secret::read_secret_file(key)?;
    let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| TlsError::File {
        what: "private key",
        path: key.to_owned(),
        message: format!("{e} (expected a PEM PKCS#8, PKCS#1 or SEC1 key)"),
    })?;
    // The server's order decides: AES-128-GCM for clients that list AES-256 first too.
    let builder =
        ServerConfig::builder_with_provider(Arc::new(aes128_first())).with_protocol_versions(versions(min))?;
    let builder = match client_ca_subjects {
        Some(hints) => {
            builder.with_client_cert_verifier(Arc::new(RequestClientCertificate { hints, provider: provider() }))
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(chain, key)?;
    config.ignore_client_order = true;
    Ok(Arc::new(config))
}

/// How an upstream's certificate is checked beyond the usual chain and name verification.
#[derive(Debug, Clone, Default)]
pub struct UpstreamTrust {
    /// SHA-256 digests; the upstream's leaf certificate or its public key (SPKI) must match one.
    pub pins: Vec<[u8; 32]>,
    /// Accept any certificate. Only for tests against throw-away servers; logged loudly.
    pub insecure_no_verify: bool,
}

/// Parses a pin given as 64 hex digits or base64 of a SHA-256 digest.
pub fn parse_pin(text: &str) -> Option<[u8; 32]> {
    use base64::Engine;
    let text = text.trim();
    let bytes = if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        (0..32).map(|i| u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()).collect::<Option<Vec<u8>>>()?
    } else {
        base64::engine::general_purpose::STANDARD.decode(text).ok()?
    };
    bytes.try_into().ok()
}

/// The SHA-256 digest of `bytes`.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// Verifies as usual, then requires the leaf certificate or its public key to match a pin.
#[derive(Debug)]
struct PinnedVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    pins: Vec<[u8; 32]>,
}

impl rustls::client::danger::ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let verified = self.inner.verify_server_cert(end_entity, intermediates, server_name, ocsp, now)?;
        let spki = x509_parser::parse_x509_certificate(end_entity.as_ref())
            .map(|(_, c)| sha256(c.public_key().raw))
            .map_err(|_| rustls::Error::General("cannot parse the upstream certificate".into()))?;
        let cert = sha256(end_entity.as_ref());
        if self.pins.iter().any(|pin| *pin == cert || *pin == spki) {
            Ok(verified)
        } else {
            Err(rustls::Error::General("the upstream certificate matches none of the configured pins".into()))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Accepts any certificate but still checks the handshake signatures.
#[derive(Debug)]
struct NoVerification(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Builds the client config for an upstream: system roots plus `extra_ca`, then `trust`'s
/// pins or (explicitly) no verification.
/// Resumes TLS sessions with the upstream (tickets, in memory) so that later logins skip the
/// certificate and signature work.
pub fn upstream_client_config(extra_ca: Option<&Path>, trust: &UpstreamTrust) -> Result<Arc<ClientConfig>, TlsError> {
    let base = client_config_with(extra_ca, upstream_provider())?;
    if trust.insecure_no_verify {
        let mut config = (*base).clone();
        config.dangerous().set_certificate_verifier(Arc::new(NoVerification(provider())));
        return Ok(Arc::new(config));
    }
    if trust.pins.is_empty() {
        return Ok(base);
    }
    let roots = root_store(extra_ca)?;
    let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), upstream_provider())
        .build()
        .map_err(|e| TlsError::Rustls(rustls::Error::General(e.to_string())))?;
    let mut config = (*base).clone();
    config.dangerous().set_certificate_verifier(Arc::new(PinnedVerifier { inner, pins: trust.pins.clone() }));
    Ok(Arc::new(config))
}

fn root_store(extra_ca: Option<&Path>) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        // A system store may hold certificates rustls cannot parse; skipping them is what
        // every TLS client does.
        let _ = roots.add(cert);
    }
    if let Some(path) = extra_ca {
        for cert in load_certs(path, "CA file")? {
            roots.add(cert).map_err(|e| TlsError::File {
                what: "CA file",
                path: path.to_owned(),
                message: e.to_string(),
            })?;
        }
    }
    Ok(roots)
}

/// Builds a client config trusting the system roots plus the PEM certificates in `extra_ca`.
pub fn client_config(extra_ca: Option<&Path>) -> Result<Arc<ClientConfig>, TlsError> {
    client_config_with(extra_ca, provider())
}

fn client_config_with(
    extra_ca: Option<&Path>,
    provider: Arc<rustls::crypto::CryptoProvider>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let roots = root_store(extra_ca)?;
    let config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(rustls::DEFAULT_VERSIONS)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Writes a new self-signed ECDSA P-256 certificate for `hostname` to `cert` and `key`
/// (the key with mode 0600), for first runs and tests.
pub fn generate_self_signed(hostname: &str, cert: &Path, key: &Path) -> Result<(), TlsError> {
    let names = vec![hostname.to_owned(), "localhost".to_owned()];
    let key_pair = rcgen::KeyPair::generate().map_err(|e| TlsError::Generate(e.to_string()))?;
    let params = rcgen::CertificateParams::new(names).map_err(|e| TlsError::Generate(e.to_string()))?;
    let certificate = params.self_signed(&key_pair).map_err(|e| TlsError::Generate(e.to_string()))?;
    let io_error = |path: &Path, e: std::io::Error| TlsError::File {
        what: "certificate",
        path: path.to_owned(),
        message: e.to_string(),
    };
    for path in [cert, key] {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| io_error(dir, e))?;
        }
    }
    crate::fsutil::write_private_atomic(key, key_pair.serialize_pem().as_bytes()).map_err(|e| io_error(key, e))?;
    std::fs::write(cert, certificate.pem()).map_err(|e| io_error(cert, e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_certificate_loads_and_key_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        generate_self_signed("mail.example.com", &cert, &key).unwrap();
        assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
        server_config(&cert, &key, TlsVersion::Tls12, None).unwrap();
        server_config(&cert, &key, TlsVersion::Tls13, None).unwrap();
    }

    #[test]
    fn expired_certificates_are_refused_with_the_date() {
        let dir = tempfile::tempdir().unwrap();
        let key_pair = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["old.example".to_owned()]).unwrap();
        params.not_before = rcgen::date_time_ymd(2001, 1, 1);
        params.not_after = rcgen::date_time_ymd(2002, 1, 1);
        let cert = params.self_signed(&key_pair).unwrap();
        let (c, k) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key_pair.serialize_pem()).unwrap();
        let err = server_config(&c, &k, TlsVersion::Tls12, None).unwrap_err().to_string();
        assert!(err.contains("expired on") && err.contains("2002"), "{err}");
    }

    #[test]
    fn pins_parse_from_hex_or_base64() {
        let hex = "ab".repeat(32);
        assert_eq!(parse_pin(&hex), Some([0xab; 32]));
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
        assert_eq!(parse_pin(&b64), Some([7; 32]));
        assert_eq!(parse_pin("abcd"), None);
        assert_eq!(parse_pin(&"zz".repeat(32)), None);
    }

    #[test]
    fn only_aead_suites_are_offered() {
        for suite in provider().cipher_suites.iter() {
            let name = format!("{:?}", suite.suite());
            assert!(name.contains("GCM") || name.contains("CHACHA20_POLY1305"), "{name}");
        }
    }

    #[test]
    fn mismatched_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n);
        generate_self_signed("a", &p("a.pem"), &p("a.key")).unwrap();
        generate_self_signed("b", &p("b.pem"), &p("b.key")).unwrap();
        assert!(server_config(&p("a.pem"), &p("b.key"), TlsVersion::Tls12, None).is_err());
    }

    #[test]
    fn missing_or_non_pem_files_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.pem");
        let err = server_config(&missing, &missing, TlsVersion::Tls12, None).unwrap_err().to_string();
        assert!(err.contains("nope.pem"), "{err}");
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not pem").unwrap();
        let err = client_config(Some(&junk)).unwrap_err().to_string();
        assert!(err.contains("junk.pem") && err.contains("no PEM"), "{err}");
    }
}
