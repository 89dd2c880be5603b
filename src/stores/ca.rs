//! The small certificate authority that issues users' client certificates, kept in
//! `state_dir/ca`: its certificate (`ca.pem`, what `[tls] client_ca` points at), its key
//! (`ca.key`, 0600), the revocation list (`crl.pem`, what `[tls] client_crl` may point at)
//! and a record of every certificate issued (`issued.json`: serial, user, expiry,
//! revocation; never a key).
//!
//! Issued certificates name the user as an email subject alternative name and are for
//! client authentication only; they go to the user as a PKCS#12 file protected by a
//! generated password (PBES2 AES-256-CBC, HMAC-SHA-256 MAC).

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyIdMethod, KeyPair, KeyUsagePurpose, RevokedCertParams, SanType, SerialNumber,
};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use zeroize::Zeroizing;

/// The CA's folder under `state_dir`.
pub const CA_DIR: &str = "ca";
/// The CA certificate (PEM) in [`CA_DIR`].
pub const CA_CERT_FILE: &str = "ca.pem";
/// The CA key (PEM, 0600) in [`CA_DIR`].
pub const CA_KEY_FILE: &str = "ca.key";
/// The CRL (PEM) in [`CA_DIR`].
pub const CRL_FILE: &str = "crl.pem";
const LEDGER_FILE: &str = "issued.json";
/// Days a CRL says it is current; every revocation re-signs it.
const CRL_DAYS: i64 = 365;

/// Why the CA could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// `ca init` found a CA already there.
    #[error(
        "a CA already exists in {0}; it is never overwritten (move the folder away to start over, which makes every issued certificate useless)"
    )]
    Exists(PathBuf),
    /// There is no CA yet.
    #[error("no CA in {0}; create one with `postern ca init`")]
    Missing(PathBuf),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The key file is not private, or unreadable.
    #[error("CA key {0}")]
    Key(#[from] crate::secret::SecretFileError),
    /// A file of the CA is damaged.
    #[error("{path}: {message}; restore it from a backup")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Building a key, certificate, CRL or PKCS#12 file failed.
    #[error("cannot build the {what}: {message}")]
    Build {
        /// "CA certificate", "client certificate", "CRL" or "PKCS#12 file".
        what: &'static str,
        /// The underlying error.
        message: String,
    },
    /// `cert revoke` was given a serial the CA never issued.
    #[error("no certificate with serial {0} was issued by this CA; see `postern cert list`")]
    UnknownSerial(String),
    /// The validity asked for is empty.
    #[error("a certificate must be valid for at least one day (--days)")]
    NoValidity,
}

/// One certificate the CA issued.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuedRecord {
    /// The serial number, lower-case hex.
    pub serial: String,
    /// The user it names.
    pub user: String,
    /// Unix time it was issued.
    pub issued_at: i64,
    /// Unix time it expires.
    pub not_after: i64,
    /// Unix time it was revoked, if it was.
    pub revoked_at: Option<i64>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Ledger {
    name: String,
    crl_number: u64,
    issued: Vec<IssuedRecord>,
}

/// A freshly issued certificate with its key, before it is packed for the user.
pub struct IssuedCertificate {
    /// The serial number, lower-case hex.
    pub serial: String,
    /// The certificate, DER.
    pub cert_der: Vec<u8>,
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The private key, PKCS#8 DER.
    pub key_der: Zeroizing<Vec<u8>>,
    /// The private key, PEM.
    pub key_pem: Zeroizing<String>,
    /// When it expires.
    pub not_after: OffsetDateTime,
}

/// The CA, opened.
pub struct Ca {
    dir: PathBuf,
    key: KeyPair,
    issuer: rcgen::Certificate,
    cert_der: Vec<u8>,
    ledger: Ledger,
}

fn build(what: &'static str) -> impl Fn(rcgen::Error) -> CaError {
    move |e| CaError::Build { what, message: e.to_string() }
}

fn io_at(path: &Path) -> impl Fn(std::io::Error) -> CaError + '_ {
    move |source| CaError::Io { path: path.to_owned(), source }
}

/// The CA certificate's parameters; rebuilt from the name alone to sign with, so what an
/// issued certificate names as its issuer is always what `ca.pem` says.
fn ca_params(name: &str) -> Result<CertificateParams, CaError> {
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(build("CA certificate"))?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params.key_identifier_method = KeyIdMethod::Sha256;
    Ok(params)
}

fn random_serial() -> [u8; 16] {
    use rand::RngCore;
    let mut bytes = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    // Positive and of a fixed length: the top bit clear, the next one set.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    bytes
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    let text: String = text.chars().filter(|c| *c != ':').collect::<String>().to_lowercase();
    if text.is_empty() || text.len() % 2 != 0 {
        return None;
    }
    (0..text.len() / 2).map(|i| u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()).collect()
}

/// A serial as the CA records it: lower-case hex without separators.
pub fn normalize_serial(text: &str) -> Option<String> {
    unhex(text.trim()).map(|bytes| hex(&bytes))
}

impl Ca {
    /// The CA folder under `state_dir`.
    pub fn dir(state_dir: &Path) -> PathBuf {
        state_dir.join(CA_DIR)
    }

    /// Creates a CA named `name`, valid for `days`, with an empty CRL, in `state_dir/ca`.
    /// Refuses when a CA (certificate or key) is already there.
    pub fn init(state_dir: &Path, name: &str, days: u32) -> Result<Ca, CaError> {
        let dir = Self::dir(state_dir);
        let (cert_file, key_file) = (dir.join(CA_CERT_FILE), dir.join(CA_KEY_FILE));
        if cert_file.exists() || key_file.exists() {
            return Err(CaError::Exists(dir));
        }
        if days == 0 {
            return Err(CaError::NoValidity);
        }
        std::fs::create_dir_all(&dir).map_err(io_at(&dir))?;
        let key = KeyPair::generate().map_err(build("CA certificate"))?;
        let mut params = ca_params(name)?;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(i64::from(days));
        params.serial_number = Some(SerialNumber::from_slice(&random_serial()));
        let cert = params.self_signed(&key).map_err(build("CA certificate"))?;
        // The key first: a certificate without its key would block a second `init`.
        crate::fsutil::write_private_atomic(&key_file, key.serialize_pem().as_bytes()).map_err(io_at(&key_file))?;
        write_public(&cert_file, cert.pem().as_bytes())?;
        let issuer = ca_params(name)?.self_signed(&key).map_err(build("CA certificate"))?;
        let mut ca = Ca {
            dir,
            key,
            issuer,
            cert_der: cert.der().to_vec(),
            ledger: Ledger { name: name.to_owned(), crl_number: 0, issued: Vec::new() },
        };
        ca.save_ledger()?;
        ca.write_crl()?;
        Ok(ca)
    }

    /// Opens the CA in `state_dir/ca`.
    pub fn open(state_dir: &Path) -> Result<Ca, CaError> {
        let dir = Self::dir(state_dir);
        let (cert_file, key_file, ledger_file) = (dir.join(CA_CERT_FILE), dir.join(CA_KEY_FILE), dir.join(LEDGER_FILE));
        if !key_file.exists() {
            return Err(CaError::Missing(dir));
        }
        let pem = crate::secret::read_secret_file(&key_file)?;
        let corrupt = |path: &Path, message: String| CaError::Corrupt { path: path.to_owned(), message };
        let pem_text = std::str::from_utf8(&pem).map_err(|e| corrupt(&key_file, e.to_string()))?;
        let key = KeyPair::from_pem(pem_text).map_err(|e| corrupt(&key_file, e.to_string()))?;
        let cert_der = crate::tls::load_certs(&cert_file, "CA certificate")
            .map_err(|e| corrupt(&cert_file, e.to_string()))?
            .remove(0)
            .to_vec();
        let text = std::fs::read_to_string(&ledger_file).map_err(io_at(&ledger_file))?;
        let ledger: Ledger = serde_json::from_str(&text).map_err(|e| corrupt(&ledger_file, e.to_string()))?;
        let issuer = ca_params(&ledger.name)?.self_signed(&key).map_err(build("CA certificate"))?;
        let ca = Ca { dir, key, issuer, cert_der, ledger };
        let subject_matches = x509_parser::parse_x509_certificate(&ca.cert_der)
            .ok()
            .zip(x509_parser::parse_x509_certificate(ca.issuer.der()).ok())
            .is_some_and(|((_, stored), (_, rebuilt))| stored.subject().as_raw() == rebuilt.subject().as_raw());
        if !subject_matches {
            return Err(corrupt(
                &cert_file,
                format!("does not belong to the CA named {:?} in {LEDGER_FILE}", ca.ledger.name),
            ));
        }
        Ok(ca)
    }

    /// The CA certificate file.
    pub fn cert_file(&self) -> PathBuf {
        self.dir.join(CA_CERT_FILE)
    }

    /// The CRL file the CA keeps itself.
    pub fn crl_file(&self) -> PathBuf {
        self.dir.join(CRL_FILE)
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// Every certificate issued, oldest first.
    pub fn issued(&self) -> &[IssuedRecord] {
        &self.ledger.issued
    }

    /// Issues a client certificate for `user` (normalized), valid from `not_before` to
    /// `not_after`, and records it.
    pub fn issue(
        &mut self,
        user: &str,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<IssuedCertificate, CaError> {
        if not_after <= not_before {
            return Err(CaError::NoValidity);
        }
        let what = "client certificate";
        let key = KeyPair::generate().map_err(build(what))?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(build(what))?;
        params.distinguished_name.push(DnType::CommonName, user);
        let email = user.try_into().map_err(build(what))?;
        params.subject_alt_names = vec![SanType::Rfc822Name(email)];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.use_authority_key_identifier_extension = true;
        params.key_identifier_method = KeyIdMethod::Sha256;
        let serial = random_serial();
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        params.not_before = not_before;
        params.not_after = not_after;
        let cert = params.signed_by(&key, &self.issuer, &self.key).map_err(build(what))?;
        let record = IssuedRecord {
            serial: hex(&serial),
            user: user.to_owned(),
            issued_at: OffsetDateTime::now_utc().unix_timestamp(),
            not_after: not_after.unix_timestamp(),
            revoked_at: None,
        };
        self.ledger.issued.push(record);
        self.save_ledger()?;
        Ok(IssuedCertificate {
            serial: hex(&serial),
            cert_der: cert.der().to_vec(),
            cert_pem: cert.pem(),
            key_der: Zeroizing::new(key.serialize_der()),
            key_pem: Zeroizing::new(key.serialize_pem()),
            not_after,
        })
    }

    /// Marks `serial` revoked and re-signs the CRL (written to [`Ca::crl_file`]); returns
    /// the record and the new CRL (PEM). Revoking twice keeps the first date.
    pub fn revoke(&mut self, serial: &str) -> Result<(IssuedRecord, String), CaError> {
        let wanted = normalize_serial(serial).ok_or_else(|| CaError::UnknownSerial(serial.to_owned()))?;
        let record = self
            .ledger
            .issued
            .iter_mut()
            .find(|r| r.serial == wanted)
            .ok_or_else(|| CaError::UnknownSerial(wanted.clone()))?;
        record.revoked_at.get_or_insert(OffsetDateTime::now_utc().unix_timestamp());
        let record = record.clone();
        self.save_ledger()?;
        let crl = self.write_crl()?;
        Ok((record, crl))
    }

    /// Signs a new CRL listing every revoked certificate, writes it to [`Ca::crl_file`], and
    /// returns it (PEM).
    fn write_crl(&mut self) -> Result<String, CaError> {
        self.ledger.crl_number += 1;
        self.save_ledger()?;
        let now = OffsetDateTime::now_utc();
        let revoked_certs = self
            .ledger
            .issued
            .iter()
            .filter_map(|r| {
                let at = OffsetDateTime::from_unix_timestamp(r.revoked_at?).ok()?;
                Some(RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&unhex(&r.serial)?),
                    revocation_time: at,
                    reason_code: None,
                    invalidity_date: None,
                })
            })
            .collect();
        let crl = CertificateRevocationListParams {
            this_update: now,
            next_update: now + time::Duration::days(CRL_DAYS),
            crl_number: SerialNumber::from_slice(&self.ledger.crl_number.to_be_bytes()),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: KeyIdMethod::Sha256,
        }
        .signed_by(&self.issuer, &self.key)
        .map_err(build("CRL"))?;
        let pem = crl.pem().map_err(build("CRL"))?;
        write_public(&self.crl_file(), pem.as_bytes())?;
        Ok(pem)
    }

    fn save_ledger(&self) -> Result<(), CaError> {
        let path = self.dir.join(LEDGER_FILE);
        let text = serde_json::to_string_pretty(&self.ledger)
            .map_err(|e| CaError::Corrupt { path: path.clone(), message: e.to_string() })?;
        crate::fsutil::write_private_atomic(&path, text.as_bytes()).map_err(io_at(&path))
    }
}

/// Writes a public file (certificate, CRL) atomically, readable by all (0644), so the
/// daemon's account can read what root wrote.
pub fn write_public(path: &Path, bytes: &[u8]) -> Result<(), CaError> {
    use std::os::unix::fs::PermissionsExt;
    crate::fsutil::write_private_atomic(path, bytes).map_err(io_at(path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).map_err(io_at(path))
}

impl IssuedCertificate {
    /// The certificate, its key and the CA certificate as a PKCS#12 file protected by
    /// `password`, the entry named after `user`.
    pub fn pkcs12(&self, user: &str, ca_der: &[u8], password: &str) -> Result<Zeroizing<Vec<u8>>, CaError> {
        let fail = |e: p12_keystore::error::Error| CaError::Build { what: "PKCS#12 file", message: e.to_string() };
        let key = p12_keystore::PrivateKey::from_der(&self.key_der).map_err(fail)?;
        let leaf = p12_keystore::Certificate::from_der(&self.cert_der).map_err(fail)?;
        let ca = p12_keystore::Certificate::from_der(ca_der).map_err(fail)?;
        let key_id = crate::tls::sha256(&self.cert_der)[..20].to_vec();
        let chain = p12_keystore::PrivateKeyChain::new(key_id, key, [leaf, ca]);
        let mut store = p12_keystore::KeyStore::new();
        store.add_entry(user, p12_keystore::KeyStoreEntry::PrivateKeyChain(chain));
        let bytes = store
            .writer(password)
            .encryption_algorithm(p12_keystore::EncryptionAlgorithm::PbeWithHmacSha256AndAes256)
            .mac_algorithm(p12_keystore::MacAlgorithm::HmacSha256)
            .write()
            .map_err(fail)?;
        Ok(Zeroizing::new(bytes))
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::access::certificate::{CertProblem, CertificateStatus, ClientCa, PresentedCertificate};

    fn presented(issued: &IssuedCertificate) -> PresentedCertificate {
        let der = rustls::pki_types::CertificateDer::from(issued.cert_der.clone());
        PresentedCertificate::from_handshake(Some(&[der])).unwrap()
    }

    #[test]
    fn init_issue_and_revoke_work_with_the_client_ca_check() {
        let dir = tempfile::tempdir().unwrap();
        let mut ca = Ca::init(dir.path(), "Example client CA", 30).unwrap();
        let mode =
            |name: &str| std::fs::metadata(dir.path().join(CA_DIR).join(name)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(CA_KEY_FILE), 0o600);
        assert_eq!(mode(CA_CERT_FILE), 0o644);
        assert_eq!(mode(CRL_FILE), 0o644);
        assert!(matches!(Ca::init(dir.path(), "again", 30), Err(CaError::Exists(_))), "never overwritten");

        let now = OffsetDateTime::now_utc();
        let issued =
            ca.issue("alice@example.com", now - time::Duration::hours(1), now + time::Duration::days(1)).unwrap();
        assert_eq!(issued.serial.len(), 32);
        // Opened again: the issuer is rebuilt from the stored name and key.
        let mut ca = Ca::open(dir.path()).unwrap();
        let later = ca.issue("bob@example.com", now - time::Duration::hours(1), now + time::Duration::days(1)).unwrap();
        assert_eq!(ca.issued().len(), 2);

        let client_ca = ClientCa::load(&ca.cert_file(), Some(&ca.crl_file())).unwrap();
        let at = rustls::pki_types::UnixTime::now();
        assert!(matches!(client_ca.judge(&presented(&issued), "alice@example.com", at), CertificateStatus::Valid(_)));
        assert!(matches!(client_ca.judge(&presented(&later), "bob@example.com", at), CertificateStatus::Valid(_)));

        let upper = issued.serial.to_uppercase();
        let (record, crl) = ca.revoke(&upper).unwrap();
        assert_eq!(record.user, "alice@example.com");
        assert!(record.revoked_at.is_some() && crl.contains("BEGIN X509 CRL"));
        assert!(matches!(ca.revoke("00ff"), Err(CaError::UnknownSerial(_))));
        let client_ca = ClientCa::load(&ca.cert_file(), Some(&ca.crl_file())).unwrap();
        assert_eq!(
            client_ca.judge(&presented(&issued), "alice@example.com", at),
            CertificateStatus::Refused(presented(&issued).id, CertProblem::Revoked)
        );
        assert!(matches!(client_ca.judge(&presented(&later), "bob@example.com", at), CertificateStatus::Valid(_)));
        assert_eq!(presented(&issued).id.serial, issued.serial, "the audit's serial is the one `cert list` shows");
    }

    #[test]
    fn the_pkcs12_file_holds_the_key_and_chain_under_the_password() {
        let dir = tempfile::tempdir().unwrap();
        let mut ca = Ca::init(dir.path(), "Example client CA", 30).unwrap();
        let now = OffsetDateTime::now_utc();
        let issued = ca.issue("carol@example.com", now, now + time::Duration::days(1)).unwrap();
        let p12 = issued.pkcs12("carol@example.com", ca.cert_der(), "s3cret-pw").unwrap();
        let store =
            p12_keystore::KeyStore::from_pkcs12(&p12, "s3cret-pw", p12_keystore::Pkcs12ImportPolicy::Relaxed).unwrap();
        let (_, chain) = store.private_key_chain().unwrap();
        assert_eq!(chain.key().as_der(), issued.key_der.as_slice());
        assert_eq!(chain.certs().len(), 2);
        assert_eq!(chain.certs()[0].as_der(), issued.cert_der.as_slice());
        assert!(
            p12_keystore::KeyStore::from_pkcs12(&p12, "wrong", p12_keystore::Pkcs12ImportPolicy::Relaxed).is_err(),
            "the password protects it"
        );
    }

    #[test]
    fn serials_are_compared_as_hex() {
        assert_eq!(normalize_serial("4A:0b").as_deref(), Some("4a0b"));
        assert_eq!(normalize_serial("xyz"), None);
        assert_eq!(normalize_serial("abc"), None);
        assert!(Ca::open(tempfile::tempdir().unwrap().path()).is_err());
    }
}
