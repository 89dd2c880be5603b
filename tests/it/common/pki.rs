//! A test certificate authority and server certificates it issues.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};

/// The test CA, created once per test binary in its own temporary folder.
pub struct Pki {
    dir: tempfile::TempDir,
    ca_cert: rcgen::Certificate,
    ca_key: KeyPair,
    /// The CA certificate in PEM, for clients (and the proxy's `upstream_ca_file`).
    pub ca_file: PathBuf,
}

/// A certificate issued by the test CA, written to PEM files.
pub struct Issued {
    /// Certificate chain (leaf, then CA) in PEM.
    pub cert_file: PathBuf,
    /// Private key in PEM.
    pub key_file: PathBuf,
}

static PKI: OnceLock<Pki> = OnceLock::new();

/// The shared test CA.
pub fn pki() -> &'static Pki {
    PKI.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temp dir for test CA");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, "Postern test CA");
        let ca_key = KeyPair::generate().expect("CA key");
        let ca_cert = params.self_signed(&ca_key).expect("CA certificate");
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca_cert.pem()).expect("write CA");
        Pki { dir, ca_cert, ca_key, ca_file }
    })
}

impl Pki {
    /// Issues a server certificate for `localhost` and 127.0.0.1 named `name` (file stem).
    pub fn issue(&self, name: &str) -> Issued {
        self.issue_in(name, self.dir.path())
    }

    /// Like [`Pki::issue`], writing the files into `dir`.
    pub fn issue_in(&self, name: &str, dir: &Path) -> Issued {
        self.issue_until(name, dir, None)
    }

    /// Like [`Pki::issue_in`], valid until midnight (UTC) starting the date `not_after`
    /// (year, month, day) when given.
    pub fn issue_until(&self, name: &str, dir: &Path, not_after: Option<(i32, u8, u8)>) -> Issued {
        let mut params = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).expect("params");
        if let Some((year, month, day)) = not_after {
            params.not_after = rcgen::date_time_ymd(year, month, day);
        }
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.ca_cert, &self.ca_key).expect("sign");
        let cert_file = dir.join(format!("{name}.crt"));
        let key_file = dir.join(format!("{name}.key"));
        std::fs::write(&cert_file, format!("{}{}", cert.pem(), self.ca_cert.pem())).expect("write cert");
        std::fs::write(&key_file, key.serialize_pem()).expect("write key");
        // Private, as the proxy requires of every secret file.
        std::fs::set_permissions(&key_file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).expect("chmod key");
        Issued { cert_file, key_file }
    }
}
