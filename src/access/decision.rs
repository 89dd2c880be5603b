//! The access decision, in one place. A login runs it in order: user name → address
//! throttle → lockout → any profile lists the address at all → directory lookup → the
//! user's profiles → password → session cap; then the upstream login with the user's
//! stored credential (`crate::upstream::credential`).
//!
//! Cheap checks run first so strangers never reach the directory, and a disallowed address
//! never gets a password checked. A client certificate is judged once per login
//! (`super::certificate`), before the first check that needs it; a profile with
//! `client_cert = "alternative"` lets a client whose address is in no profile past the
//! first filter only with a certificate that is valid and names the user. The per-profile evaluation ([`evaluate`]) is the same for
//! a login, the re-check of live sessions after a change ([`revalidate`]) and
//! `postern access explain`.
//!
//! # Directory and app passwords
//!
//! Each profile says which password it accepts (`password = "directory" | "app" |
//! "either"`). A user's profiles combine as a union of grants: a login is admitted when one
//! profile both lets the client in (mail access, protocol, address) and accepts the kind of
//! password given. So a user in an office profile (`directory`, the office network) and a
//! mobile profile (`app`, anywhere) may use either password from the office, where both
//! profiles let the client in, and only an app password elsewhere. The password check tries
//! only the kinds the profiles letting the client in accept ([`Evaluation::accepted`]): app
//! passwords first (no directory round trip), then the directory password. A password the
//! profiles do not accept is never sent to the directory. A wrong password counts toward
//! the lockout whichever kind was expected ([`Denial::WrongPassword`],
//! [`Denial::AppPasswordRequired`]); a right app password where only the directory password
//! is accepted is refused as [`Denial::AppPasswordNotAccepted`] and is not a guess. The
//! user's groups always come from the directory, which must know the user.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use super::certificate::{CertProblem, CertificateId, CertificateStatus, PresentedCertificate};
use super::lockout::Refused;
use super::profiles::{CertRequirement, PasswordKind, Profile, Profiles};
use super::store::{Reservation, ReserveError, SessionSlot, StoreError};
use crate::metrics::{LoginResult, Outcome};
use crate::protocol::{CredentialFault, Credentials, Protocol};
use crate::secret::Secret;
use crate::session::registry::LiveSession;
use crate::state::State;
use crate::stores::app_passwords::{AppPasswords, Matched};
use crate::stores::directory::{AccountState, Directory, DirectoryError};
use crate::upstream::LoggedIn;
use crate::upstream::credential::LoginError;
use crate::upstream::route::RouteTaken;

/// The precise reason a login was refused. The client never sees it (every refusal reads
/// the same); the audit log does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Denial {
    /// The user name is not a usable mail address.
    InvalidUserName,
    /// Too many recent password failures for this user.
    Locked,
    /// Too many recent failed logins from the client's address.
    Throttled,
    /// The client's address is in no profile at all.
    IpNotInAnyProfile,
    /// The directory does not know the user.
    UnknownUser,
    /// No profile applies to the user.
    NoProfile,
    /// Profiles apply, but none has mail access switched on.
    MailAccessOff,
    /// Profiles apply, but none covers this protocol.
    ProtocolNotAllowed,
    /// Profiles apply, but none lists the client's address.
    IpNotAllowed,
    /// The directory password is wrong.
    WrongPassword,
    /// No upstream credential is stored for the user.
    NoUpstreamCredential,
    /// SASL PLAIN asked to act as someone other than the authenticating user.
    AuthzidMismatch,
    /// The password is empty.
    EmptyPassword,
    /// The directory says the account is disabled.
    AccountDisabled,
    /// The directory says the account has expired.
    AccountExpired,
    /// The directory says the password has expired.
    PasswordExpired,
    /// The directory says the password must be changed (after a reset) before use.
    PasswordMustChange,
    /// The directory itself has locked the account (its own lockout, not Postern's).
    AccountLockedInDirectory,
    /// The directory does not allow the user to log on at this time.
    LogonNotAllowedNow,
    /// The directory does not allow the user to log on from this workstation.
    WorkstationNotAllowed,
    /// A login attempted in plaintext, before STARTTLS.
    TlsRequired,
    /// The user's route has no upstream for the protocol.
    NotRouted,
    /// An admin console login from an address outside `[console] allow`.
    ConsoleAddressNotAllowed,
    /// An admin console login by someone in none of `[console] admin_groups`.
    NotAnAdmin,
    /// A profile requires a client certificate and the client presented none.
    CertificateMissing,
    /// The client certificate is valid but names another user.
    CertificateOtherUser,
    /// The client certificate has expired.
    CertificateExpired,
    /// The client certificate is not valid yet.
    CertificateNotYetValid,
    /// The client certificate is in the client CRL.
    CertificateRevoked,
    /// The client certificate is not from the client CA, or its chain or signature is bad.
    CertificateUntrusted,
    /// The profiles letting the client in accept only app passwords, and the password is
    /// none of the user's app passwords (a wrong guess, or the directory password, which is
    /// then never sent to the directory). Counts as a wrong password.
    AppPasswordRequired,
    /// The password is one of the user's app passwords, but the profiles letting the client
    /// in accept only the directory password.
    AppPasswordNotAccepted,
}

impl Denial {
    /// The reason as written to the audit log and the metrics' `reason` label.
    pub fn reason(self) -> &'static str {
        match self {
            Denial::InvalidUserName => "invalid user name",
            Denial::Locked => "locked out after repeated password failures",
            Denial::Throttled => "client IP throttled after repeated failed logins",
            Denial::IpNotInAnyProfile => "client IP not in any profile",
            Denial::UnknownUser => "unknown user",
            Denial::NoProfile => "no profile applies to the user",
            Denial::MailAccessOff => "user's profiles do not grant mail access",
            Denial::ProtocolNotAllowed => "protocol not allowed by the user's profiles",
            Denial::IpNotAllowed => "client IP not allowed by the user's profiles",
            Denial::WrongPassword => "wrong password",
            Denial::NoUpstreamCredential => "no upstream credential stored for the user",
            Denial::AuthzidMismatch => "authorization identity differs from the user",
            Denial::EmptyPassword => "empty password",
            Denial::AccountDisabled => "account disabled in the directory",
            Denial::AccountExpired => "account expired in the directory",
            Denial::PasswordExpired => "directory password expired",
            Denial::PasswordMustChange => "directory password must be changed",
            Denial::AccountLockedInDirectory => "account locked in the directory",
            Denial::LogonNotAllowedNow => "directory does not allow logons at this time",
            Denial::WorkstationNotAllowed => "directory does not allow logons from this workstation",
            Denial::TlsRequired => "login attempted before STARTTLS",
            Denial::NotRouted => "the user's route has no upstream for the protocol",
            Denial::ConsoleAddressNotAllowed => "client IP not allowed to use the console",
            Denial::NotAnAdmin => "not in a console admin group",
            Denial::CertificateMissing => "client certificate missing",
            Denial::CertificateOtherUser => "client certificate names another user",
            Denial::CertificateExpired => "client certificate expired",
            Denial::CertificateNotYetValid => "client certificate not valid yet",
            Denial::CertificateRevoked => "client certificate revoked",
            Denial::CertificateUntrusted => "client certificate from an unknown CA or with a bad chain",
            Denial::AppPasswordRequired => "not an app password of the user; the user's profiles require one here",
            Denial::AppPasswordNotAccepted => {
                "app password given; the user's profiles accept only the directory password here"
            }
        }
    }

    /// Whether the denial is a wrong password, counted toward the user's lockout (and the
    /// address's throttle) through the lockout reservation.
    pub fn is_wrong_password(self) -> bool {
        matches!(self, Denial::WrongPassword | Denial::AppPasswordRequired)
    }
}

impl From<AccountState> for Denial {
    fn from(state: AccountState) -> Self {
        match state {
            AccountState::Disabled => Denial::AccountDisabled,
            AccountState::Expired => Denial::AccountExpired,
            AccountState::PasswordExpired => Denial::PasswordExpired,
            AccountState::PasswordMustChange => Denial::PasswordMustChange,
            AccountState::Locked => Denial::AccountLockedInDirectory,
            AccountState::LogonHours => Denial::LogonNotAllowedNow,
            AccountState::Workstation => Denial::WorkstationNotAllowed,
        }
    }
}

impl From<CertProblem> for Denial {
    fn from(problem: CertProblem) -> Self {
        match problem {
            CertProblem::OtherUser => Denial::CertificateOtherUser,
            CertProblem::Expired => Denial::CertificateExpired,
            CertProblem::NotYetValid => Denial::CertificateNotYetValid,
            CertProblem::Revoked => Denial::CertificateRevoked,
            CertProblem::Untrusted => Denial::CertificateUntrusted,
        }
    }
}

impl From<CredentialFault> for Denial {
    fn from(fault: CredentialFault) -> Self {
        match fault {
            CredentialFault::AuthzidMismatch => Denial::AuthzidMismatch,
            CredentialFault::EmptyPassword => Denial::EmptyPassword,
            CredentialFault::InvalidUserName => Denial::InvalidUserName,
            CredentialFault::TlsRequired => Denial::TlsRequired,
        }
    }
}

impl std::fmt::Display for Denial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.reason())
    }
}

/// Why a login that the profiles and the password allowed still could not be completed:
/// a service is down or refused us. The client is told to try later.
#[derive(Debug, thiserror::Error)]
pub enum Outage {
    /// The directory could not answer.
    #[error("directory: {0}")]
    Directory(DirectoryError),
    /// The user already has the most concurrent sessions allowed.
    #[error("too many concurrent sessions for the user (limit {limit})")]
    SessionCap {
        /// The per-user limit.
        limit: usize,
    },
    /// The upstream side failed: vault, credential, token endpoint or upstream server.
    #[error(transparent)]
    Upstream(LoginError),
    /// The shared store of lockout and session counters is down and `[state]
    /// on_store_down = "closed"`.
    #[error(transparent)]
    Store(StoreError),
}

/// Why a login did not get through.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// Refused; the client sees the one denial text.
    #[error("{0}")]
    Denied(Denial),
    /// Could not be decided or completed; the client is told to try later.
    #[error(transparent)]
    Unavailable(Outage),
}

impl Outage {
    /// The bounded `reason` label of the metrics: one per kind of outage.
    pub fn label(&self) -> &'static str {
        match self {
            Outage::Directory(_) => "directory unavailable",
            Outage::SessionCap { .. } => "too many concurrent sessions for the user",
            Outage::Store(_) => "state store unavailable",
            Outage::Upstream(e) => match e {
                LoginError::NoCredential => Denial::NoUpstreamCredential.reason(),
                LoginError::NotRouted { .. } => Denial::NotRouted.reason(),
                LoginError::Vault(_) => "vault unreadable",
                LoginError::WrongKind { .. } => "stored credential of the wrong kind",
                LoginError::NoTokenSource(_) => "no OAuth2 token source",
                LoginError::Token { .. } => "OAuth2 token unavailable",
                LoginError::Refused { .. } => "upstream refused the stored credential",
                LoginError::Unreachable { .. } => "upstream unavailable",
            },
        }
    }
}

impl Refusal {
    /// The metrics' `outcome` and `reason` labels of this refusal.
    pub fn labels(&self) -> LoginResult {
        match self {
            Refusal::Denied(denial) => LoginResult { outcome: Outcome::Denied, reason: denial.reason() },
            Refusal::Unavailable(outage) => LoginResult { outcome: Outcome::Unavailable, reason: outage.label() },
        }
    }

    /// Whether the refusal came from the upstream side (vault, token, upstream server),
    /// which is what a user's last upstream result reports.
    pub fn is_upstream(&self) -> bool {
        matches!(self, Refusal::Unavailable(Outage::Upstream(_)))
    }
}

impl From<LoginError> for Refusal {
    fn from(error: LoginError) -> Self {
        match error {
            LoginError::NoCredential => Refusal::Denied(Denial::NoUpstreamCredential),
            LoginError::NotRouted { .. } => Refusal::Denied(Denial::NotRouted),
            other => Refusal::Unavailable(Outage::Upstream(other)),
        }
    }
}

impl From<DirectoryError> for Refusal {
    fn from(error: DirectoryError) -> Self {
        match error {
            DirectoryError::UnknownUser => Refusal::Denied(Denial::UnknownUser),
            DirectoryError::WrongPassword => Refusal::Denied(Denial::WrongPassword),
            DirectoryError::Account(state) => Refusal::Denied(Denial::from(state)),
            e @ (DirectoryError::Unavailable(_) | DirectoryError::Config(_)) => {
                Refusal::Unavailable(Outage::Directory(e))
            }
        }
    }
}

/// Which profile let a login through, for the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The profile's name.
    pub profile: String,
    /// The allow entry that matched the client's address; `None` when a certificate let
    /// the client in from an address the profile does not list.
    pub entry: Option<ipnet::IpNet>,
    /// The client certificate the profile required or accepted.
    pub certificate: Option<CertificateId>,
}

impl std::fmt::Display for Grant {
    /// `office (203.0.113.0/24)`, `office (203.0.113.0/24 + certificate)` or
    /// `travel (certificate)`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.entry, &self.certificate) {
            (Some(entry), None) => write!(f, "{} ({entry})", self.profile),
            (Some(entry), Some(_)) => write!(f, "{} ({entry} + certificate)", self.profile),
            (None, _) => write!(f, "{} (certificate)", self.profile),
        }
    }
}

/// What one profile says about one client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The profile's mail access switch is off.
    MailAccessOff,
    /// The profile does not cover the protocol.
    ProtocolNotCovered,
    /// No allow entry contains the address.
    AddressNotListed,
    /// This allow entry contains the address (and the certificate the profile requires, if
    /// it does, is valid and names the user).
    Allows(ipnet::IpNet),
    /// The address is not listed, but the profile accepts a valid certificate naming the
    /// user instead, and the client presented one.
    AllowsByCertificate,
    /// The profile requires or would accept a certificate, and the client's does not do.
    CertificateRefused(Denial),
}

/// The profiles applying to a user, each with its verdict, and the decision they make.
#[derive(Debug)]
pub struct Evaluation<'a> {
    /// Each applicable profile in file order, with what it says.
    pub profiles: Vec<(&'a Profile, Verdict)>,
    /// The decision: the first profile that allows, or the most specific refusal.
    pub decision: Result<Grant, Denial>,
    /// The client's certificate, when it is valid and names the user.
    certificate: Option<CertificateId>,
}

/// What one profile that grants mail access for the protocol says about a client at `ip`
/// with `certificate`.
fn verdict(profile: &Profile, ip: IpAddr, certificate: &CertificateStatus) -> Verdict {
    let listed = profile.matching_entry(ip).copied();
    let refused = |problem: CertProblem| Verdict::CertificateRefused(problem.into());
    match (profile.client_cert, listed, certificate) {
        (CertRequirement::Off, Some(entry), _) => Verdict::Allows(entry),
        (CertRequirement::Alternative, None, CertificateStatus::Refused(_, problem)) => refused(*problem),
        (CertRequirement::Alternative, None, CertificateStatus::Valid(_)) => Verdict::AllowsByCertificate,
        (_, None, _) => Verdict::AddressNotListed,
        (CertRequirement::Alternative, Some(entry), _) => Verdict::Allows(entry),
        (CertRequirement::Required, Some(entry), CertificateStatus::Valid(_)) => Verdict::Allows(entry),
        (CertRequirement::Required, Some(_), CertificateStatus::Absent) => {
            Verdict::CertificateRefused(Denial::CertificateMissing)
        }
        (CertRequirement::Required, Some(_), CertificateStatus::Refused(_, problem)) => refused(*problem),
    }
}

/// The kinds of password the profiles letting a client in accept, together.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Accepted {
    /// The directory password.
    pub directory: bool,
    /// The user's app passwords.
    pub app: bool,
}

impl Evaluation<'_> {
    /// What the profiles that let the client in accept (none when none does).
    pub fn accepted(&self) -> Accepted {
        let mut accepted = Accepted::default();
        for (profile, verdict) in &self.profiles {
            if matches!(verdict, Verdict::Allows(_) | Verdict::AllowsByCertificate) {
                accepted.directory |= profile.password.accepts(PasswordKind::Directory);
                accepted.app |= profile.password.accepts(PasswordKind::App);
            }
        }
        accepted
    }

    /// The decision for a login with a password of `kind`: the first profile that lets the
    /// client in and accepts `kind`; the evaluation's refusal when none lets the client in;
    /// else the refusal naming the kind the profiles want.
    pub fn grant(&self, kind: PasswordKind) -> Result<Grant, Denial> {
        if let Err(denial) = &self.decision {
            return Err(*denial);
        }
        let certificate = |p: &Profile| match p.client_cert {
            CertRequirement::Off => None,
            _ => self.certificate.clone(),
        };
        let accepting = self.profiles.iter().find_map(|(p, v)| match v {
            Verdict::Allows(entry) if p.password.accepts(kind) => {
                Some(Grant { profile: p.name.clone(), entry: Some(*entry), certificate: certificate(p) })
            }
            Verdict::AllowsByCertificate if p.password.accepts(kind) => {
                Some(Grant { profile: p.name.clone(), entry: None, certificate: certificate(p) })
            }
            _ => None,
        });
        accepting.ok_or(match kind {
            PasswordKind::Directory => Denial::AppPasswordRequired,
            PasswordKind::App => Denial::AppPasswordNotAccepted,
        })
    }
}

/// Evaluates the profiles applying to `user` (normalized) with directory `groups` for a
/// client at `ip` using `protocol` with `certificate` (judged for this user).
pub fn evaluate<'a>(
    profiles: &'a Profiles,
    user: &str,
    groups: &[String],
    protocol: Protocol,
    ip: IpAddr,
    certificate: &CertificateStatus,
) -> Evaluation<'a> {
    let verdicts: Vec<(&Profile, Verdict)> = profiles
        .for_user(user, groups)
        .into_iter()
        .map(|p| {
            let verdict = if !p.mail_access {
                Verdict::MailAccessOff
            } else if !p.covers(protocol) {
                Verdict::ProtocolNotCovered
            } else {
                verdict(p, ip, certificate)
            };
            (p, verdict)
        })
        .collect();
    let used = |p: &Profile| match (p.client_cert, certificate) {
        (CertRequirement::Required | CertRequirement::Alternative, CertificateStatus::Valid(id)) => Some(id.clone()),
        _ => None,
    };
    let allowed = verdicts.iter().find_map(|(p, v)| match v {
        Verdict::Allows(entry) => Some(Grant { profile: p.name.clone(), entry: Some(*entry), certificate: used(p) }),
        Verdict::AllowsByCertificate => Some(Grant { profile: p.name.clone(), entry: None, certificate: used(p) }),
        _ => None,
    });
    let certificate_refusal = verdicts.iter().find_map(|(_, v)| match v {
        Verdict::CertificateRefused(denial) => Some(*denial),
        _ => None,
    });
    let decision = match allowed {
        Some(grant) => Ok(grant),
        None if verdicts.is_empty() => Err(Denial::NoProfile),
        None if verdicts.iter().all(|(_, v)| *v == Verdict::MailAccessOff) => Err(Denial::MailAccessOff),
        None if verdicts.iter().all(|(_, v)| matches!(v, Verdict::MailAccessOff | Verdict::ProtocolNotCovered)) => {
            Err(Denial::ProtocolNotAllowed)
        }
        // A certificate problem says more than "address not listed": it is what would have
        // let the client in.
        None => Err(certificate_refusal.unwrap_or(Denial::IpNotAllowed)),
    };
    let certificate = match certificate {
        CertificateStatus::Valid(id) => Some(id.clone()),
        _ => None,
    };
    Evaluation { profiles: verdicts, decision, certificate }
}

/// The decision of [`evaluate`] alone.
pub fn check_profiles(
    profiles: &Profiles,
    user: &str,
    groups: &[String],
    protocol: Protocol,
    ip: IpAddr,
    certificate: &CertificateStatus,
) -> Result<Grant, Denial> {
    evaluate(profiles, user, groups, protocol, ip, certificate).decision
}

/// The decision of [`evaluate`] for a login whose password was of `kind`
/// ([`Evaluation::grant`]).
pub fn check_profiles_for(
    profiles: &Profiles,
    user: &str,
    groups: &[String],
    protocol: Protocol,
    ip: IpAddr,
    certificate: &CertificateStatus,
    kind: PasswordKind,
) -> Result<Grant, Denial> {
    evaluate(profiles, user, groups, protocol, ip, certificate).grant(kind)
}

/// The user name as the decision sees it: [`crate::user::normalize`], refused as
/// [`Denial::InvalidUserName`].
pub fn normalize_user(user: &str) -> Result<String, Denial> {
    crate::user::normalize(user).map_err(|_| Denial::InvalidUserName)
}

/// A login that got through: the upstream session, the profile that admitted it and the
/// route it took.
pub struct Admitted {
    /// The user's session slot, held while the session lives.
    pub slot: SessionSlot,
    /// The logged-in upstream session.
    pub upstream: LoggedIn,
    /// The profile and allow entry that matched.
    pub grant: Grant,
    /// The user's route (`crate::upstream::route`) and the upstream's `host:port` on it.
    pub route: RouteTaken,
    /// The label of the app password the client logged in with; `None` for the directory
    /// password.
    pub app_password: Option<String>,
}

/// Runs the whole decision for `credentials` from the client at `peer` (with the
/// certificate it presented in the TLS handshake, if any), and logs in upstream if it
/// passes. Every refusal is counted against the client's address; wrong passwords also
/// against the user.
pub async fn admit(
    state: &State,
    protocol: Protocol,
    peer: SocketAddr,
    credentials: &Credentials,
    certificate: Option<&PresentedCertificate>,
) -> Result<Admitted, Refusal> {
    let ip = peer.ip();
    let result = decide(state, protocol, peer, credentials, certificate).await;
    if let Err(Refusal::Denied(denial)) = &result {
        if !denial.is_wrong_password() {
            state.counters.record_address_failure(ip).await;
        }
    }
    result
}

/// The decision for credentials the pre-login dialogue refused itself (see
/// [`crate::protocol::Step::Refused`]): denied without asking the directory, and counted
/// against the client's address like every refusal that is not a password check.
pub async fn refuse(state: &State, ip: IpAddr, fault: CredentialFault) -> Refusal {
    state.counters.record_address_failure(ip).await;
    Refusal::Denied(Denial::from(fault))
}

/// The lockout's cheap first look (user locked, address throttled), before anything costs:
/// the same for mail and console logins.
pub(super) async fn precheck(state: &State, user: &str, ip: IpAddr) -> Result<(), Refusal> {
    match state.counters.precheck(user, ip).await.map_err(|e| Refusal::Unavailable(Outage::Store(e)))? {
        Some(Refused::Throttled) => Err(Refusal::Denied(Denial::Throttled)),
        Some(Refused::Locked) => Err(Refusal::Denied(Denial::Locked)),
        None => Ok(()),
    }
}

/// The lockout's reservation of one password check for `user` from `ip`, in one atomic step
/// (in this process or one script in the shared store): parallel guesses, on any instance,
/// cannot get more checks than the limits allow.
pub(super) async fn reserve<'a>(state: &'a State, user: &str, ip: IpAddr) -> Result<Reservation<'a>, Refusal> {
    state.counters.reserve(user, ip).await.map_err(|e| match e {
        ReserveError::Refused(Refused::Locked) => Refusal::Denied(Denial::Locked),
        ReserveError::Refused(Refused::Throttled) => Refusal::Denied(Denial::Throttled),
        ReserveError::Down(e) => Refusal::Unavailable(Outage::Store(e)),
    })
}

/// Settles `reservation` as a wrong password; when that locks the user out, says so in the
/// log and to the alert webhooks.
pub(super) async fn wrong_password(state: &State, reservation: Reservation<'_>, user: &str, ip: IpAddr) {
    if reservation.failed().await {
        tracing::warn!(user = %user, "user locked out after repeated wrong passwords");
        let lockout = state.counters.local().config();
        state.alerts.user_locked(user, ip, lockout.max_failures, lockout.lock_secs);
    }
}

async fn decide(
    state: &State,
    protocol: Protocol,
    peer: SocketAddr,
    credentials: &Credentials,
    presented: Option<&PresentedCertificate>,
) -> Result<Admitted, Refusal> {
    let ip = peer.ip();
    let user = normalize_user(&credentials.user).map_err(Refusal::Denied)?;
    precheck(state, &user, ip).await?;
    let profiles = state.profiles();
    let certificate = super::certificate::judge(state.client_ca().as_deref(), presented, &user);
    if !profiles.any_allows(ip) {
        // Only a certificate can still let this client in, and only through a profile that
        // accepts one instead of an address; one that does not do is refused here, before
        // the directory is asked.
        match &certificate {
            CertificateStatus::Valid(_) if profiles.any_accepts_certificates() => {}
            CertificateStatus::Refused(_, problem) if profiles.any_accepts_certificates() => {
                return Err(Refusal::Denied(Denial::from(*problem)));
            }
            _ => return Err(Refusal::Denied(Denial::IpNotInAnyProfile)),
        }
    }
    let directory = state.directory();
    let started = Instant::now();
    let entry = directory.lookup(&user).await;
    state.metrics().directory_latency.observe(started.elapsed());
    // Refusals before the password check cost what the check would have, so the time of
    // the answer does not tell whether the user exists.
    let entry = match entry {
        Ok(entry) => entry,
        Err(e) => {
            let refusal = Refusal::from(e);
            if matches!(refusal, Refusal::Denied(_)) {
                let accepted = evaluate(&profiles, &user, &[], protocol, ip, &certificate).accepted();
                equalize(state, &directory, &credentials.password, accepted).await;
            }
            return Err(refusal);
        }
    };
    if let Some(groups) = &entry.groups {
        if let Err(denial) = check_profiles(&profiles, &user, groups, protocol, ip, &certificate) {
            equalize(state, &directory, &credentials.password, Accepted::default()).await;
            return Err(Refusal::Denied(denial));
        }
    }
    // The passwords to try. When the groups are known only after the directory password
    // check, the directory password is tried, and app passwords where a profile naming the
    // user accepts them.
    let known_groups = entry.groups.as_deref().unwrap_or_default();
    let mut accepted = evaluate(&profiles, &user, known_groups, protocol, ip, &certificate).accepted();
    accepted.directory |= entry.groups.is_none();
    let reservation = reserve(state, &user, ip).await?;
    let verified = check_password(state, &directory, &user, &entry, &credentials.password, accepted).await;
    let Verified { kind, groups, app } = match verified {
        Ok(verified) => {
            reservation.succeeded().await;
            verified
        }
        Err(Failed::Wrong(denial)) => {
            wrong_password(state, reservation, &user, ip).await;
            return Err(Refusal::Denied(denial));
        }
        // Not a guess: the directory refuses the account whatever the password (disabled,
        // expired, locked there, ...), a right app password where it is not accepted, or an
        // outage. The dropped reservation counts as nothing.
        Err(Failed::Other(refusal)) => {
            drop(reservation);
            return Err(refusal);
        }
    };
    let grant = match check_profiles_for(&profiles, &user, &groups, protocol, ip, &certificate, kind) {
        Ok(grant) => grant,
        Err(denial) => {
            // A right password the profiles refuse (the groups came with the directory's
            // check): not a guess, so the reservation counted nothing. `admit` leaves the
            // address count of a wrong-password denial to the reservation; count it here.
            if denial.is_wrong_password() {
                state.counters.record_address_failure(ip).await;
            }
            return Err(Refusal::Denied(denial));
        }
    };
    if let Some(matched) = &app {
        state.app_password_usage().record(&matched.hash);
    }
    let routing = state.upstreams.routing();
    let route = routing.resolve(&user, &groups);
    let Some(address) = route.address(protocol) else {
        return Err(Refusal::Denied(Denial::NotRouted));
    };
    let route_taken = RouteTaken::new(route.name(), address);
    let slot = state
        .counters
        .try_user(&user)
        .await
        .map_err(|e| Refusal::Unavailable(Outage::Store(e)))?
        .ok_or(Refusal::Unavailable(Outage::SessionCap { limit: state.counters.per_user() }))?;
    let metrics = state.metrics();
    let observe = |elapsed| metrics.upstream_latency.observe(elapsed);
    let upstream = match state
        .upstreams
        .login(
            route,
            protocol,
            &user,
            &credentials.upstream_prefix,
            credentials.client_hello.as_deref(),
            Some(peer),
            &observe,
        )
        .await
    {
        Ok(upstream) => upstream,
        Err(e) => {
            if let LoginError::Refused { address, answer } = &e {
                state.alerts.upstream_refused(&user, protocol, address, answer);
            }
            return Err(e.into());
        }
    };
    Ok(Admitted { slot, upstream, grant, route: route_taken, app_password: app.map(|m| m.label) })
}

/// A password the check accepted.
struct Verified {
    kind: PasswordKind,
    /// The user's groups: from the directory's check, or its lookup for an app password.
    groups: Vec<String>,
    /// The app password that matched.
    app: Option<Matched>,
}

/// Why the password check did not accept a password.
enum Failed {
    /// A wrong password, counted toward the lockout.
    Wrong(Denial),
    /// Anything else: not counted.
    Other(Refusal),
}

/// Checks `password` of `user` as the profiles allow (`accepted`): the user's app passwords
/// first, then the directory password.
async fn check_password(
    state: &State,
    directory: &Directory,
    user: &str,
    entry: &crate::stores::directory::Entry,
    password: &Secret,
    accepted: Accepted,
) -> Result<Verified, Failed> {
    let app_passwords = state.app_passwords();
    if accepted.app {
        match app_passwords.check(user, password).await {
            Ok(Some(matched)) => {
                let groups = entry.groups.clone().unwrap_or_default();
                return Ok(Verified { kind: PasswordKind::App, groups, app: Some(matched) });
            }
            Ok(None) if !accepted.directory => return Err(Failed::Wrong(Denial::AppPasswordRequired)),
            Ok(None) => {}
            Err(e) => return Err(Failed::Other(e.into())),
        }
    }
    let started = Instant::now();
    let verified = directory.verify(entry, password).await;
    state.metrics().directory_latency.observe(started.elapsed());
    match verified {
        Ok(groups) => Ok(Verified { kind: PasswordKind::Directory, groups, app: None }),
        Err(DirectoryError::WrongPassword) => {
            // Where app passwords are in use, a refused password may be one given where
            // only the directory password is accepted: the audit says so instead of "wrong
            // password". Every user's wrong password pays this check (a dummy one for those
            // without app passwords), so its time does not tell who has app passwords.
            if !accepted.app && !app_passwords.is_empty() {
                if let Ok(Some(matched)) = app_passwords.check(user, password).await {
                    tracing::info!(user = %user, label = %crate::user::escape(&matched.label), "an app password was given where only the directory password is accepted");
                    return Err(Failed::Other(Refusal::Denied(Denial::AppPasswordNotAccepted)));
                }
            }
            Err(Failed::Wrong(Denial::WrongPassword))
        }
        Err(e) => Err(Failed::Other(e.into())),
    }
}

/// Spends on a refusal before the password check what a wrong password's check
/// ([`check_password`]) would have cost for the kinds `accepted` (the directory password
/// when none): the same hashes in the same order. Whether the user exists or is refused by
/// a profile does not show in the time.
async fn equalize(state: &State, directory: &Directory, password: &Secret, accepted: Accepted) {
    let accepted = if accepted == Accepted::default() { Accepted { directory: true, app: false } } else { accepted };
    if accepted.app {
        AppPasswords::equalize(password).await;
    }
    if accepted.directory {
        directory.equalize_refusal(password).await;
    }
    if !accepted.app && !state.app_passwords().is_empty() {
        AppPasswords::equalize(password).await;
    }
}

/// Re-runs the password-free part of the decision for every live session with the
/// profiles, vault, directory and routes in force now, and closes the sessions that no
/// longer pass or whose route or upstream changed; returns how many.
///
/// Groups are looked up again only when some profile or route names groups. A directory
/// that cannot answer, or does not tell groups without a password, keeps sessions open:
/// only a definite "no" closes one.
pub async fn revalidate(state: &State) -> usize {
    let sessions = state.live().snapshot();
    if sessions.is_empty() {
        return 0;
    }
    let profiles = state.profiles();
    let routing = state.upstreams.routing();
    let vault = state.upstreams.vault();
    let directory = state.directory();
    let client_ca = state.client_ca();
    let app_passwords = state.app_passwords();
    let mut groups_of: HashMap<String, Result<Option<Vec<String>>, &'static str>> = HashMap::new();
    let mut closed = 0;
    for session in sessions {
        let reason = if !vault.contains(&session.user) {
            Some("closed: the user's upstream credential was removed from the vault".to_owned())
        } else if let Some(reason) = revoked_app_password(&app_passwords, &session) {
            Some(reason)
        } else {
            if !groups_of.contains_key(&session.user) {
                let groups = if profiles.uses_groups() || routing.uses_groups() {
                    match directory.lookup(&session.user).await {
                        Ok(entry) => Ok(entry.groups),
                        Err(DirectoryError::UnknownUser) => Err("closed: the user was removed from the directory"),
                        Err(e) => {
                            tracing::warn!(user = %session.user, error = %e, "cannot re-check the groups of a live session; it stays open");
                            Ok(None)
                        }
                    }
                } else {
                    Ok(Some(Vec::new()))
                };
                groups_of.insert(session.user.clone(), groups);
            }
            match &groups_of[&session.user] {
                Err(reason) => Some((*reason).to_owned()),
                Ok(groups) => {
                    let known = groups.as_deref().unwrap_or_default();
                    let certificate =
                        super::certificate::judge(client_ca.as_deref(), session.certificate.as_ref(), &session.user);
                    match check_profiles_for(
                        &profiles,
                        &session.user,
                        known,
                        session.protocol,
                        session.ip,
                        &certificate,
                        session.password_kind(),
                    ) {
                        Ok(_) if groups.is_none() && routing.uses_groups() => None,
                        Ok(_) => {
                            let route = routing.resolve(&session.user, known);
                            let now = RouteTaken::new(route.name(), route.address(session.protocol).unwrap_or("none"));
                            (now != session.route).then(|| {
                                format!(
                                    "closed: the user's route changed from {} ({}) to {} ({})",
                                    session.route.name, session.route.upstream, now.name, now.upstream
                                )
                            })
                        }
                        Err(_) if groups.is_none() => None,
                        Err(denial) => Some(format!("closed: profile change no longer allows this client ({denial})")),
                    }
                }
            }
        };
        if let Some(reason) = reason {
            tracing::info!(user = %session.user, protocol = %session.protocol, ip = %session.ip, reason, "closing a live session");
            session.revoke(reason);
            closed += 1;
        }
    }
    state.metrics().revoked(closed as u64);
    closed
}

/// Why `session` must close because the app password it logged in with is gone; `None`
/// when it logged in with the directory password or its app password still exists.
fn revoked_app_password(app_passwords: &AppPasswords, session: &LiveSession) -> Option<String> {
    let label = session.app_password.as_deref()?;
    (!app_passwords.contains(&session.user, label))
        .then(|| format!("closed: the app password {:?} was revoked", crate::user::escape(label)))
}

/// Closes the live sessions whose app password is no longer in the app passwords in force
/// (after the file changed); returns how many.
pub fn close_revoked_app_password_sessions(state: &State) -> usize {
    let app_passwords = state.app_passwords();
    let mut closed = 0;
    for session in state.live().snapshot() {
        if let Some(reason) = revoked_app_password(&app_passwords, &session) {
            tracing::info!(user = %session.user, protocol = %session.protocol, ip = %session.ip, reason, "closing a live session");
            session.revoke(reason);
            closed += 1;
        }
    }
    state.metrics().revoked(closed as u64);
    closed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profiles() -> Profiles {
        Profiles::parse(
            r#"
            [[profile]]
            name = "office"
            allow = ["127.0.0.1/32"]
            users = ["alice@example.com", "dave@example.com"]
            protocols = ["imap", "smtp"]
            [[profile]]
            name = "off"
            mail_access = false
            allow = ["0.0.0.0/0"]
            users = ["bob@example.com"]
            [[profile]]
            name = "remote"
            allow = ["192.0.2.0/24"]
            groups = ["travellers"]
            "#,
        )
        .unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn check(user: &str, groups: &[&str], protocol: Protocol, addr: &str) -> Result<Grant, Denial> {
        let groups: Vec<String> = groups.iter().map(|g| g.to_string()).collect();
        check_profiles(&profiles(), user, &groups, protocol, ip(addr), &CertificateStatus::Absent)
    }

    #[test]
    fn each_refusal_has_its_own_reason() {
        assert_eq!(check("carol@example.com", &[], Protocol::Imap, "127.0.0.1"), Err(Denial::NoProfile));
        assert_eq!(check("bob@example.com", &[], Protocol::Imap, "127.0.0.1"), Err(Denial::MailAccessOff));
        assert_eq!(check("alice@example.com", &[], Protocol::Pop3, "127.0.0.1"), Err(Denial::ProtocolNotAllowed));
        assert_eq!(check("alice@example.com", &[], Protocol::Imap, "127.0.0.2"), Err(Denial::IpNotAllowed));
        assert_eq!(check("alice@example.com", &[], Protocol::Imap, "127.0.0.1").unwrap().profile, "office");
        assert_eq!(check("dave@example.com", &["Travellers"], Protocol::Pop3, "192.0.2.50").unwrap().profile, "remote");
    }

    #[test]
    fn a_disabled_profile_does_not_hide_why_an_enabled_one_refuses() {
        assert_eq!(
            check("bob@example.com", &["travellers"], Protocol::Imap, "198.51.100.1"),
            Err(Denial::IpNotAllowed)
        );
        assert_eq!(check("bob@example.com", &["travellers"], Protocol::Imap, "192.0.2.1").unwrap().profile, "remote");
    }

    #[test]
    fn the_evaluation_gives_each_profile_its_verdict_in_file_order() {
        let p = profiles();
        let groups = vec!["travellers".to_owned()];
        let e = evaluate(&p, "alice@example.com", &groups, Protocol::Pop3, ip("192.0.2.9"), &CertificateStatus::Absent);
        let verdicts: Vec<(&str, Verdict)> = e.profiles.iter().map(|(p, v)| (p.name.as_str(), v.clone())).collect();
        assert_eq!(
            verdicts,
            [("office", Verdict::ProtocolNotCovered), ("remote", Verdict::Allows("192.0.2.0/24".parse().unwrap()))]
        );
        assert_eq!(e.decision.unwrap().profile, "remote");
    }

    fn certificate_profiles() -> Profiles {
        Profiles::parse(
            r#"
            [[profile]]
            name = "office"
            allow = ["10.0.0.0/8"]
            users = ["alice@example.com"]
            client_cert = "required"
            [[profile]]
            name = "anywhere"
            allow = ["192.0.2.0/24"]
            users = ["bob@example.com"]
            client_cert = "alternative"
            "#,
        )
        .unwrap()
    }

    fn certificate(status: &str) -> CertificateStatus {
        let id = CertificateId { fingerprint: "ab".repeat(32), serial: "01".into() };
        match status {
            "none" => CertificateStatus::Absent,
            "valid" => CertificateStatus::Valid(id),
            "revoked" => CertificateStatus::Refused(id, CertProblem::Revoked),
            "expired" => CertificateStatus::Refused(id, CertProblem::Expired),
            "other user" => CertificateStatus::Refused(id, CertProblem::OtherUser),
            _ => CertificateStatus::Refused(id, CertProblem::Untrusted),
        }
    }

    #[test]
    fn required_needs_the_address_and_a_valid_certificate() {
        let p = certificate_profiles();
        let check = |addr: &str, cert: &str| {
            check_profiles(&p, "alice@example.com", &[], Protocol::Imap, ip(addr), &certificate(cert))
        };
        let grant = check("10.1.2.3", "valid").unwrap();
        assert_eq!(grant.to_string(), "office (10.0.0.0/8 + certificate)");
        assert_eq!(grant.certificate.unwrap().serial, "01");
        assert_eq!(check("10.1.2.3", "none"), Err(Denial::CertificateMissing));
        assert_eq!(check("10.1.2.3", "revoked"), Err(Denial::CertificateRevoked));
        assert_eq!(check("10.1.2.3", "expired"), Err(Denial::CertificateExpired));
        assert_eq!(check("10.1.2.3", "other user"), Err(Denial::CertificateOtherUser));
        assert_eq!(check("10.1.2.3", "untrusted"), Err(Denial::CertificateUntrusted));
        assert_eq!(
            check("198.51.100.1", "valid"),
            Err(Denial::IpNotAllowed),
            "a certificate does not replace the address"
        );
    }

    #[test]
    fn alternative_takes_the_address_or_a_valid_certificate() {
        let p = certificate_profiles();
        let check = |addr: &str, cert: &str| {
            check_profiles(&p, "bob@example.com", &[], Protocol::Imap, ip(addr), &certificate(cert))
        };
        let by_address = check("192.0.2.5", "none").unwrap();
        assert_eq!((by_address.entry, by_address.certificate), (Some("192.0.2.0/24".parse().unwrap()), None));
        assert_eq!(check("192.0.2.5", "revoked").unwrap().profile, "anywhere", "the address alone suffices");
        let by_certificate = check("198.51.100.1", "valid").unwrap();
        assert_eq!(by_certificate.to_string(), "anywhere (certificate)");
        assert_eq!(check("198.51.100.1", "none"), Err(Denial::IpNotAllowed));
        assert_eq!(check("198.51.100.1", "revoked"), Err(Denial::CertificateRevoked));
        assert_eq!(check("198.51.100.1", "other user"), Err(Denial::CertificateOtherUser));
        let e = evaluate(&p, "bob@example.com", &[], Protocol::Imap, ip("198.51.100.1"), &certificate("valid"));
        assert_eq!(e.profiles[0].1, Verdict::AllowsByCertificate);
    }

    #[test]
    fn certificates_play_no_part_in_profiles_that_do_not_ask_for_them() {
        for cert in ["none", "valid", "revoked"] {
            let grant = check_profiles(
                &profiles(),
                "alice@example.com",
                &[],
                Protocol::Imap,
                ip("127.0.0.1"),
                &certificate(cert),
            );
            assert_eq!(grant.unwrap().certificate, None, "{cert}");
            let refused = check_profiles(
                &profiles(),
                "alice@example.com",
                &[],
                Protocol::Imap,
                ip("127.0.0.2"),
                &certificate(cert),
            );
            assert_eq!(refused, Err(Denial::IpNotAllowed), "{cert}");
        }
    }

    #[test]
    fn a_missing_upstream_credential_is_a_denial_and_other_upstream_failures_are_outages() {
        assert!(matches!(Refusal::from(LoginError::NoCredential), Refusal::Denied(Denial::NoUpstreamCredential)));
        let refused = LoginError::Refused { address: "u:1".into(), answer: "NO".into() };
        assert!(matches!(Refusal::from(refused), Refusal::Unavailable(Outage::Upstream(LoginError::Refused { .. }))));
        assert!(matches!(Refusal::from(DirectoryError::UnknownUser), Refusal::Denied(Denial::UnknownUser)));
        let down = DirectoryError::Unavailable("down".into());
        assert!(matches!(Refusal::from(down), Refusal::Unavailable(Outage::Directory(_))));
    }

    #[test]
    fn each_directory_account_state_is_its_own_denial() {
        let states = [
            AccountState::Disabled,
            AccountState::Expired,
            AccountState::PasswordExpired,
            AccountState::PasswordMustChange,
            AccountState::Locked,
            AccountState::LogonHours,
            AccountState::Workstation,
        ];
        let mut reasons = std::collections::HashSet::new();
        for state in states {
            let Refusal::Denied(denial) = Refusal::from(DirectoryError::Account(state)) else {
                panic!("{state:?} is not a denial");
            };
            assert_ne!(denial, Denial::WrongPassword);
            assert_ne!(denial, Denial::Locked);
            assert!(reasons.insert(denial.reason()), "{state:?} shares its reason");
        }
    }

    /// One refusal of every kind: every denial, every outage, every upstream failure as an
    /// outage. The matches stop compiling when a kind is added; list it here then.
    fn one_refusal_of_every_kind() -> Vec<Refusal> {
        use std::time::Duration;

        use crate::config::UpstreamAuthMode;
        use crate::stores::oauth::TokenError;
        use crate::stores::vault::{SecretKind, VaultError};
        use crate::upstream::UpstreamError;

        let denials = [
            Denial::InvalidUserName,
            Denial::Locked,
            Denial::Throttled,
            Denial::IpNotInAnyProfile,
            Denial::UnknownUser,
            Denial::NoProfile,
            Denial::MailAccessOff,
            Denial::ProtocolNotAllowed,
            Denial::IpNotAllowed,
            Denial::WrongPassword,
            Denial::NoUpstreamCredential,
            Denial::AuthzidMismatch,
            Denial::EmptyPassword,
            Denial::AccountDisabled,
            Denial::AccountExpired,
            Denial::PasswordExpired,
            Denial::PasswordMustChange,
            Denial::AccountLockedInDirectory,
            Denial::LogonNotAllowedNow,
            Denial::WorkstationNotAllowed,
            Denial::TlsRequired,
            Denial::NotRouted,
            Denial::ConsoleAddressNotAllowed,
            Denial::NotAnAdmin,
            Denial::CertificateMissing,
            Denial::CertificateOtherUser,
            Denial::CertificateExpired,
            Denial::CertificateNotYetValid,
            Denial::CertificateRevoked,
            Denial::CertificateUntrusted,
            Denial::AppPasswordRequired,
            Denial::AppPasswordNotAccepted,
        ];
        for denial in denials {
            match denial {
                Denial::InvalidUserName
                | Denial::Locked
                | Denial::Throttled
                | Denial::IpNotInAnyProfile
                | Denial::UnknownUser
                | Denial::NoProfile
                | Denial::MailAccessOff
                | Denial::ProtocolNotAllowed
                | Denial::IpNotAllowed
                | Denial::WrongPassword
                | Denial::NoUpstreamCredential
                | Denial::AuthzidMismatch
                | Denial::EmptyPassword
                | Denial::AccountDisabled
                | Denial::AccountExpired
                | Denial::PasswordExpired
                | Denial::PasswordMustChange
                | Denial::AccountLockedInDirectory
                | Denial::LogonNotAllowedNow
                | Denial::WorkstationNotAllowed
                | Denial::TlsRequired
                | Denial::NotRouted
                | Denial::ConsoleAddressNotAllowed
                | Denial::NotAnAdmin => {}
                Denial::CertificateMissing
                | Denial::CertificateOtherUser
                | Denial::CertificateExpired
                | Denial::CertificateNotYetValid
                | Denial::CertificateRevoked
                | Denial::CertificateUntrusted => {}
                Denial::AppPasswordRequired | Denial::AppPasswordNotAccepted => {}
            }
        }
        let upstream_failures = vec![
            LoginError::NoCredential,
            LoginError::Vault(VaultError::KeyMissing { path: "/nowhere/vault.key".into() }),
            LoginError::WrongKind {
                protocol: Protocol::Imap,
                mode: UpstreamAuthMode::Xoauth2,
                stored: SecretKind::Password,
                needed: SecretKind::RefreshToken,
            },
            LoginError::NotRouted { route: "m365".into(), protocol: Protocol::Pop3 },
            LoginError::NoTokenSource(Protocol::Smtp),
            LoginError::Token { mailbox: "u@x".into(), source: TokenError::Sign("no key".into()) },
            LoginError::Refused { address: "u:1".into(), answer: "NO".into() },
            LoginError::Unreachable { address: "u:1".into(), source: UpstreamError::Timeout(Duration::from_secs(1)) },
        ];
        for failure in &upstream_failures {
            match failure {
                LoginError::NoCredential
                | LoginError::Vault(_)
                | LoginError::WrongKind { .. }
                | LoginError::NotRouted { .. }
                | LoginError::NoTokenSource(_)
                | LoginError::Token { .. }
                | LoginError::Refused { .. }
                | LoginError::Unreachable { .. } => {}
            }
        }
        let mut outages = vec![
            Outage::Directory(DirectoryError::Unavailable("down".into())),
            Outage::SessionCap { limit: 2 },
            Outage::Store(StoreError("down".into())),
        ];
        outages.extend(upstream_failures.into_iter().map(Outage::Upstream));
        for outage in &outages {
            match outage {
                Outage::Directory(_) | Outage::SessionCap { .. } | Outage::Upstream(_) | Outage::Store(_) => {}
            }
        }
        let refusals: Vec<Refusal> =
            denials.into_iter().map(Refusal::Denied).chain(outages.into_iter().map(Refusal::Unavailable)).collect();
        for refusal in &refusals {
            match refusal {
                Refusal::Denied(_) | Refusal::Unavailable(_) => {}
            }
        }
        refusals
    }

    #[test]
    fn every_kind_of_refusal_is_counted_under_its_own_reason() {
        let refusals = one_refusal_of_every_kind();
        let metrics = crate::metrics::Metrics::new();
        for refusal in &refusals {
            metrics.login(refusal.labels());
        }
        let text = metrics.render();
        let counted: Vec<&str> = text.lines().filter(|l| l.starts_with("postern_logins_total{")).collect();
        assert_eq!(counted.len(), refusals.len(), "one series per kind of refusal:\n{text}");
        for refusal in &refusals {
            let LoginResult { outcome, reason } = refusal.labels();
            let line = format!("postern_logins_total{{outcome=\"{}\",reason=\"{reason}\"}} 1", outcome.as_str());
            assert!(
                counted.contains(&line.as_str()),
                "{refusal:?} is not counted once on its own: no {line} in\n{text}"
            );
        }

        let reasons = |outcome: Outcome| -> Vec<&'static str> {
            refusals.iter().map(Refusal::labels).filter(|l| l.outcome == outcome).map(|l| l.reason).collect()
        };
        let (denied, unavailable) = (reasons(Outcome::Denied), reasons(Outcome::Unavailable));
        for list in [&denied, &unavailable] {
            let distinct: std::collections::HashSet<_> = list.iter().collect();
            assert_eq!(distinct.len(), list.len(), "a reason is shared: {list:?}");
        }
        let shared: Vec<_> = denied.iter().filter(|r| unavailable.contains(r)).collect();
        assert_eq!(
            shared,
            [&Denial::NoUpstreamCredential.reason(), &Denial::NotRouted.reason()],
            "only a missing credential or route upstream reads the same as a denial and as an outage"
        );
        assert!(!denied.contains(&LoginResult::OK.reason) && !unavailable.contains(&LoginResult::OK.reason));
    }

    /// A user in an office profile (directory password, office network), a mobile profile
    /// (app passwords, anywhere, IMAP only) and a lab profile (either, the lab network).
    fn password_profiles() -> Profiles {
        Profiles::parse(
            r#"
            [[profile]]
            name = "office"
            allow = ["10.0.0.0/8"]
            users = ["erin@example.com"]
            [[profile]]
            name = "mobile"
            allow = ["0.0.0.0/0"]
            users = ["erin@example.com"]
            protocols = ["imap"]
            password = "app"
            [[profile]]
            name = "lab"
            allow = ["192.0.2.0/24"]
            groups = ["lab"]
            password = "either"
            "#,
        )
        .unwrap()
    }

    #[test]
    fn profiles_of_different_password_kinds_combine_as_a_union_of_grants() {
        let p = password_profiles();
        let grant = |groups: &[&str], protocol, addr: &str, kind| {
            let groups: Vec<String> = groups.iter().map(|g| g.to_string()).collect();
            let none = CertificateStatus::Absent;
            check_profiles_for(&p, "erin@example.com", &groups, protocol, ip(addr), &none, kind).map(|g| g.profile)
        };
        let accepted = |protocol, addr: &str| {
            evaluate(&p, "erin@example.com", &[], protocol, ip(addr), &CertificateStatus::Absent).accepted()
        };
        use PasswordKind::{App, Directory};
        // From the office both profiles let the client in: either password, each through its profile.
        assert_eq!(accepted(Protocol::Imap, "10.1.2.3"), Accepted { directory: true, app: true });
        assert_eq!(grant(&[], Protocol::Imap, "10.1.2.3", Directory).unwrap(), "office");
        assert_eq!(grant(&[], Protocol::Imap, "10.1.2.3", App).unwrap(), "mobile");
        // Elsewhere only the mobile profile does: app passwords only.
        assert_eq!(accepted(Protocol::Imap, "198.51.100.7"), Accepted { directory: false, app: true });
        assert_eq!(grant(&[], Protocol::Imap, "198.51.100.7", Directory), Err(Denial::AppPasswordRequired));
        assert_eq!(grant(&[], Protocol::Imap, "198.51.100.7", App).unwrap(), "mobile");
        // POP3 from the office: the mobile profile does not cover it, so the directory password only.
        assert_eq!(accepted(Protocol::Pop3, "10.1.2.3"), Accepted { directory: true, app: false });
        assert_eq!(grant(&[], Protocol::Pop3, "10.1.2.3", App), Err(Denial::AppPasswordNotAccepted));
        // An address no profile lets in is refused as before, whatever the password.
        assert_eq!(grant(&[], Protocol::Pop3, "198.51.100.7", App), Err(Denial::IpNotAllowed));
        assert_eq!(accepted(Protocol::Pop3, "198.51.100.7"), Accepted::default());
        // A group profile with "either" accepts both kinds from its network.
        assert_eq!(grant(&["lab"], Protocol::Pop3, "192.0.2.9", App).unwrap(), "lab");
        assert_eq!(grant(&["lab"], Protocol::Pop3, "192.0.2.9", Directory).unwrap(), "lab");
    }

    #[test]
    fn only_wrong_passwords_count_toward_the_lockout() {
        assert!(Denial::WrongPassword.is_wrong_password());
        assert!(Denial::AppPasswordRequired.is_wrong_password());
        assert!(!Denial::AppPasswordNotAccepted.is_wrong_password());
        assert!(!Denial::IpNotAllowed.is_wrong_password());
    }

    #[test]
    fn invalid_user_names_are_a_denial() {
        assert_eq!(normalize_user(" Alice@Example.COM ").unwrap(), "alice@example.com");
        assert_eq!(normalize_user("a b"), Err(Denial::InvalidUserName));
    }
}
