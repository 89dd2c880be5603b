//! Client certificates: the CA (and CRL) clients' certificates must chain to, what a
//! client presented in its TLS handshake, and the judgement the access decision uses: is
//! the certificate valid now, and does it name the user logging in?
//!
//! The handshake only proves the client holds the certificate's key
//! (`crate::tls::server_config`); everything else is judged here, after the handshake, with
//! the CA and CRL in force at that moment, so the audit log can say why a certificate was
//! refused and a reload (a new CRL) applies to the next login and to live sessions.

use std::path::Path;
use std::sync::Arc;

use rustls::DistinguishedName;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use rustls::{CertificateError, RootCertStore};
use x509_parser::extensions::GeneralName;
use x509_parser::oid_registry::Oid;

use crate::tls::TlsError;

/// The Microsoft User Principal Name `otherName` (1.3.6.1.4.1.311.20.2.3).
const UPN_OID: &[u64] = &[1, 3, 6, 1, 4, 1, 311, 20, 2, 3];

/// Why a presented certificate does not let its holder in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CertProblem {
    /// Valid, but for someone else: no email or UPN name in it is the user logging in.
    OtherUser,
    /// Past its `notAfter`.
    Expired,
    /// Before its `notBefore`.
    NotYetValid,
    /// Listed in the client CRL.
    Revoked,
    /// Not issued by the client CA, a broken chain, a bad signature or not meant for
    /// client authentication.
    Untrusted,
}

/// What identifies a presented certificate in the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateId {
    /// SHA-256 of the certificate (DER), lower-case hex.
    pub fingerprint: String,
    /// The serial number, lower-case hex.
    pub serial: String,
}

impl std::fmt::Display for CertificateId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sha256={} serial={}", self.fingerprint, self.serial)
    }
}

/// The certificate chain a client presented in its TLS handshake (leaf first), with its id.
#[derive(Debug, Clone)]
pub struct PresentedCertificate {
    chain: Vec<CertificateDer<'static>>,
    /// The leaf's fingerprint and serial.
    pub id: CertificateId,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl PresentedCertificate {
    /// The chain a handshake delivered; `None` when the client sent no certificate.
    pub fn from_handshake(chain: Option<&[CertificateDer<'_>]>) -> Option<Self> {
        let chain: Vec<CertificateDer<'static>> = chain?.iter().map(|c| c.clone().into_owned()).collect();
        let leaf = chain.first()?;
        let serial = x509_parser::parse_x509_certificate(leaf.as_ref())
            .map(|(_, c)| hex(c.raw_serial()))
            .unwrap_or_else(|_| "unparsable".to_owned());
        let id = CertificateId { fingerprint: hex(&crate::tls::sha256(leaf.as_ref())), serial };
        Some(Self { chain, id })
    }

    /// The leaf certificate.
    pub fn leaf(&self) -> &CertificateDer<'static> {
        &self.chain[0]
    }
}

/// The user names a certificate is for: its email (rfc822Name) and Microsoft UPN
/// (`otherName` 1.3.6.1.4.1.311.20.2.3) subject alternative names, each normalized by
/// [`crate::user::normalize`]. Names that are not usable user names are left out.
pub fn identities(der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    let upn = Oid::from(UPN_OID).ok();
    san.value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::RFC822Name(email) => Some((*email).to_owned()),
            GeneralName::OtherName(oid, value) if Some(oid) == upn.as_ref() => upn_value(value),
            _ => None,
        })
        .filter_map(|name| crate::user::normalize(&name).ok())
        .collect()
}

/// The UTF8String inside a UPN `otherName` value (`[0] EXPLICIT UTF8String`).
fn upn_value(value: &[u8]) -> Option<String> {
    use x509_parser::der_parser::asn1_rs::{Any, Class, FromDer, Tag};
    let (_, explicit) = Any::from_der(value).ok()?;
    if explicit.class() != Class::ContextSpecific || explicit.tag() != Tag(0) {
        return None;
    }
    let (_, string) = Any::from_der(explicit.data).ok()?;
    if string.tag() != Tag::Utf8String {
        return None;
    }
    std::str::from_utf8(string.data).ok().map(str::to_owned)
}

/// The certificate side of one login: nothing presented, a certificate that is valid now
/// and names the user, or one that does not let its holder in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertificateStatus {
    /// The client presented no certificate (or no client CA is configured).
    Absent,
    /// Valid now, issued by the client CA, not revoked, naming the user.
    Valid(CertificateId),
    /// Presented, but refused for this reason.
    Refused(CertificateId, CertProblem),
}

impl CertificateStatus {
    /// The presented certificate's id, valid or not.
    pub fn id(&self) -> Option<&CertificateId> {
        match self {
            CertificateStatus::Absent => None,
            CertificateStatus::Valid(id) | CertificateStatus::Refused(id, _) => Some(id),
        }
    }
}

/// `[tls] client_ca` and `client_crl`, loaded: what a client certificate must chain to and
/// must not be listed in.
#[derive(Debug)]
pub struct ClientCa {
    verifier: Arc<dyn ClientCertVerifier>,
    revocation_lists: usize,
}

impl ClientCa {
    /// Loads the CA bundle (PEM) at `ca` and the CRL file (PEM or DER) at `crl`.
    pub fn load(ca: &Path, crl: Option<&Path>) -> Result<Self, TlsError> {
        let mut roots = RootCertStore::empty();
        for cert in crate::tls::load_certs(ca, "client CA")? {
            roots.add(cert).map_err(|e| TlsError::File {
                what: "client CA",
                path: ca.to_owned(),
                message: format!("{e} (expected the PEM certificates of the CA that issues client certificates)"),
            })?;
        }
        let crls = match crl {
            Some(path) => crate::tls::load_crls(path)?,
            None => Vec::new(),
        };
        let revocation_lists = crls.len();
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), crate::tls::provider())
                .with_crls(crls)
                .only_check_end_entity_revocation()
                .allow_unknown_revocation_status()
                .allow_unauthenticated()
                .build()
                .map_err(|e| {
                    let (what, path) = match (&e, crl) {
                        (rustls::server::VerifierBuilderError::InvalidCrl(_), Some(path)) => ("client CRL", path),
                        _ => ("client CA", ca),
                    };
                    TlsError::File { what, path: path.to_owned(), message: e.to_string() }
                })?;
        Ok(Self { verifier, revocation_lists })
    }

    /// The subjects of the CA's certificates: the hint clients get of which certificate to send.
    pub fn subjects(&self) -> Vec<DistinguishedName> {
        self.verifier.root_hint_subjects().to_vec()
    }

    /// How many CRLs are loaded.
    pub fn revocation_lists(&self) -> usize {
        self.revocation_lists
    }

    /// Judges `presented` for `user` (normalized) at `now`: chain to the CA, validity
    /// period, revocation, then the name.
    pub fn judge(&self, presented: &PresentedCertificate, user: &str, now: UnixTime) -> CertificateStatus {
        let id = presented.id.clone();
        let (leaf, intermediates) = (&presented.chain[0], &presented.chain[1..]);
        if let Err(e) = self.verifier.verify_client_cert(leaf, intermediates, now) {
            return CertificateStatus::Refused(id, problem_of(&e));
        }
        if identities(leaf.as_ref()).iter().any(|name| name == user) {
            CertificateStatus::Valid(id)
        } else {
            CertificateStatus::Refused(id, CertProblem::OtherUser)
        }
    }
}

/// Judges what a client presented for `user` with the client CA in force (`None`: none
/// configured, so no certificate was asked for and none counts).
pub fn judge(ca: Option<&ClientCa>, presented: Option<&PresentedCertificate>, user: &str) -> CertificateStatus {
    match (ca, presented) {
        (Some(ca), Some(presented)) => ca.judge(presented, user, UnixTime::now()),
        _ => CertificateStatus::Absent,
    }
}

fn problem_of(error: &rustls::Error) -> CertProblem {
    match error {
        rustls::Error::InvalidCertificate(e) => match e {
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => CertProblem::Expired,
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => CertProblem::NotYetValid,
            CertificateError::Revoked => CertProblem::Revoked,
            _ => CertProblem::Untrusted,
        },
        _ => CertProblem::Untrusted,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use rcgen::{CertificateParams, DnType, IsCa, KeyPair, OtherNameValue, SanType};

    struct TestCa {
        cert: rcgen::Certificate,
        key: KeyPair,
    }

    fn ca(name: &str) -> TestCa {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).unwrap();
        TestCa { cert, key }
    }

    fn leaf(ca: &TestCa, names: Vec<SanType>, serial: u8, days: (i64, i64)) -> PresentedCertificate {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = names;
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&[serial]));
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now + time::Duration::days(days.0);
        params.not_after = now + time::Duration::days(days.1);
        let cert = params.signed_by(&key, &ca.cert, &ca.key).unwrap();
        PresentedCertificate::from_handshake(Some(&[cert.der().clone()])).unwrap()
    }

    fn email(address: &str) -> SanType {
        SanType::Rfc822Name(address.try_into().unwrap())
    }

    fn upn(name: &str) -> SanType {
        SanType::OtherName((UPN_OID.to_vec(), OtherNameValue::Utf8String(name.to_owned())))
    }

    fn write_ca(dir: &Path, ca: &TestCa) -> std::path::PathBuf {
        let path = dir.join("ca.pem");
        std::fs::write(&path, ca.cert.pem()).unwrap();
        path
    }

    fn crl(ca: &TestCa, serials: &[u8]) -> rcgen::CertificateRevocationList {
        let now = time::OffsetDateTime::now_utc();
        rcgen::CertificateRevocationListParams {
            this_update: now,
            next_update: now + time::Duration::days(30),
            crl_number: rcgen::SerialNumber::from_slice(&[1]),
            issuing_distribution_point: None,
            revoked_certs: serials
                .iter()
                .map(|s| rcgen::RevokedCertParams {
                    serial_number: rcgen::SerialNumber::from_slice(&[*s]),
                    revocation_time: now,
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        }
        .signed_by(&ca.cert, &ca.key)
        .unwrap()
    }

    #[test]
    fn email_and_upn_names_are_normalized_like_user_names() {
        let ca = ca("Test CA");
        let cert = leaf(
            &ca,
            vec![
                email(" Alice@Example.COM"),
                upn("ALICE.UPN@corp.example"),
                SanType::DnsName("x.example".try_into().unwrap()),
            ],
            1,
            (-1, 30),
        );
        assert_eq!(identities(cert.leaf().as_ref()), ["alice@example.com", "alice.upn@corp.example"]);
        let cert = leaf(&ca, vec![email("bad name@example.com")], 2, (-1, 30));
        assert!(identities(cert.leaf().as_ref()).is_empty(), "a name that is no user name names no one");
        assert!(identities(b"not a certificate").is_empty());
    }

    #[test]
    fn a_valid_certificate_counts_only_for_the_user_it_names() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ca("Test CA");
        let client_ca = ClientCa::load(&write_ca(dir.path(), &ca), None).unwrap();
        let alice = leaf(&ca, vec![email("alice@example.com")], 7, (-1, 30));
        let now = UnixTime::now();
        assert_eq!(client_ca.judge(&alice, "alice@example.com", now), CertificateStatus::Valid(alice.id.clone()));
        assert_eq!(
            client_ca.judge(&alice, "bob@example.com", now),
            CertificateStatus::Refused(alice.id.clone(), CertProblem::OtherUser)
        );
        let by_upn = leaf(&ca, vec![upn("Carol@Example.com")], 8, (-1, 30));
        assert!(matches!(client_ca.judge(&by_upn, "carol@example.com", now), CertificateStatus::Valid(_)));
        assert_eq!(alice.id.serial, "07");
        assert_eq!(alice.id.fingerprint.len(), 64);
        assert_eq!(judge(None, Some(&alice), "alice@example.com"), CertificateStatus::Absent, "no CA, no certificate");
        assert_eq!(judge(Some(&client_ca), None, "alice@example.com"), CertificateStatus::Absent);
    }

    #[test]
    fn expired_future_foreign_and_revoked_certificates_each_have_their_reason() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ca("Test CA");
        let ca_file = write_ca(dir.path(), &ca);
        let now = UnixTime::now();
        let problem =
            |client_ca: &ClientCa, cert: &PresentedCertificate| match client_ca.judge(cert, "alice@example.com", now) {
                CertificateStatus::Refused(_, problem) => Some(problem),
                _ => None,
            };
        let client_ca = ClientCa::load(&ca_file, None).unwrap();
        assert_eq!(
            problem(&client_ca, &leaf(&ca, vec![email("alice@example.com")], 1, (-30, -1))),
            Some(CertProblem::Expired)
        );
        assert_eq!(
            problem(&client_ca, &leaf(&ca, vec![email("alice@example.com")], 2, (2, 30))),
            Some(CertProblem::NotYetValid)
        );
        let stranger = self::ca("Test CA");
        assert_eq!(
            problem(&client_ca, &leaf(&stranger, vec![email("alice@example.com")], 3, (-1, 30))),
            Some(CertProblem::Untrusted),
            "same name, other key: not our CA"
        );

        let crl_file = dir.path().join("crl.pem");
        std::fs::write(&crl_file, crl(&ca, &[4]).pem().unwrap()).unwrap();
        let with_crl = ClientCa::load(&ca_file, Some(&crl_file)).unwrap();
        assert_eq!(with_crl.revocation_lists(), 1);
        assert_eq!(
            problem(&with_crl, &leaf(&ca, vec![email("alice@example.com")], 4, (-1, 30))),
            Some(CertProblem::Revoked)
        );
        assert_eq!(problem(&with_crl, &leaf(&ca, vec![email("alice@example.com")], 5, (-1, 30))), None);
    }

    #[test]
    fn crls_load_from_pem_or_der_and_bad_files_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ca("Test CA");
        let ca_file = write_ca(dir.path(), &ca);
        let list = crl(&ca, &[9]);
        let der = dir.path().join("crl.der");
        std::fs::write(&der, list.der()).unwrap();
        assert_eq!(crate::tls::load_crls(&der).unwrap().len(), 1);
        let revoked = leaf(&ca, vec![email("alice@example.com")], 9, (-1, 30));
        let client_ca = ClientCa::load(&ca_file, Some(&der)).unwrap();
        assert_eq!(
            client_ca.judge(&revoked, "alice@example.com", UnixTime::now()),
            CertificateStatus::Refused(revoked.id.clone(), CertProblem::Revoked)
        );
        let pem = dir.path().join("two.pem");
        std::fs::write(&pem, format!("{}{}", list.pem().unwrap(), crl(&ca, &[]).pem().unwrap())).unwrap();
        assert_eq!(crate::tls::load_crls(&pem).unwrap().len(), 2);

        let junk = dir.path().join("junk.crl");
        std::fs::write(&junk, "hello").unwrap();
        let err = crate::tls::load_crls(&junk).unwrap_err().to_string();
        assert!(err.contains("junk.crl") && err.contains("neither"), "{err}");
        let garbled = dir.path().join("garbled.crl");
        std::fs::write(&garbled, [0x30, 0x03, 1, 2, 3]).unwrap();
        let err = ClientCa::load(&ca_file, Some(&garbled)).unwrap_err().to_string();
        assert!(err.contains("garbled.crl"), "{err}");
        let err = ClientCa::load(&junk, None).unwrap_err().to_string();
        assert!(err.contains("junk.crl") && err.contains("client CA"), "{err}");
    }
}
