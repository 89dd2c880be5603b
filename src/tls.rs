//! TLS for both sides: the server config clients see, and the client configs used to reach
//! upstreams and the directory. One crypto provider (aws-lc-rs) everywhere.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::config::TlsVersion;

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate or key file is missing, unreadable or not PEM.
    #[error("{what} {path}: {message}")]
    File {
        /// "certificate", "private key" or "CA file".
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
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

static TLS13_ONLY: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];

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

/// Builds the server config clients see, from a PEM chain and key.
pub fn server_config(cert: &Path, key: &Path, min: TlsVersion) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = load_certs(cert, "certificate")?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::File {
        what: "private key",
        path: key.to_owned(),
        message: format!("{e} (expected a PEM PKCS#8, PKCS#1 or SEC1 key)"),
    })?;
    let config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(versions(min))?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    Ok(Arc::new(config))
}

/// Builds a client config trusting the system roots plus the PEM certificates in `extra_ca`.
pub fn client_config(extra_ca: Option<&Path>) -> Result<Arc<ClientConfig>, TlsError> {
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
    let config = ClientConfig::builder_with_provider(provider())
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
        server_config(&cert, &key, TlsVersion::Tls12).unwrap();
        server_config(&cert, &key, TlsVersion::Tls13).unwrap();
    }

    #[test]
    fn mismatched_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n);
        generate_self_signed("a", &p("a.pem"), &p("a.key")).unwrap();
        generate_self_signed("b", &p("b.pem"), &p("b.key")).unwrap();
        assert!(server_config(&p("a.pem"), &p("b.key"), TlsVersion::Tls12).is_err());
    }

    #[test]
    fn missing_or_non_pem_files_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.pem");
        let err = server_config(&missing, &missing, TlsVersion::Tls12).unwrap_err().to_string();
        assert!(err.contains("nope.pem"), "{err}");
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not pem").unwrap();
        let err = client_config(Some(&junk)).unwrap_err().to_string();
        assert!(err.contains("junk.pem") && err.contains("no PEM"), "{err}");
    }
}
