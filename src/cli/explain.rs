//! `postern access explain USER IP`: the password-free part of the access decision, spelled
//! out: which profiles apply to the user, what client certificate and which password each
//! asks for, why each does or does not let the address in, and which route (upstream) the
//! login would take. It runs the decision's own evaluation (`access::decision::evaluate`),
//! without a certificate, with a valid one for the user, or with a certificate file judged
//! against the configured client CA and CRL.

use std::net::IpAddr;
use std::path::Path;

use anyhow::Context;

use super::{load_config, normalized};

/// Adds one line to the explanation.
macro_rules! say {
    ($out:expr, $($arg:tt)*) => {
        $out.push(format!($($arg)*))
    };
}
use crate::access::certificate::{CertificateId, CertificateStatus, ClientCa, PresentedCertificate};
use crate::access::decision::{Denial, Evaluation, Grant, Verdict, evaluate};
use crate::access::profiles::{CertRequirement, PasswordKind, PasswordPolicy, Profiles};
use crate::config::{Config, UpstreamAuthMode};
use crate::protocol::Protocol;
use crate::stores::app_passwords::AppPasswords;
use crate::stores::directory::{Directory, DirectoryError};
use crate::upstream::route::{DEFAULT_ROUTE, RouteMatchers};

/// What a profile's `password` setting means, for the explanation.
fn password_policy(policy: PasswordPolicy) -> &'static str {
    match policy {
        PasswordPolicy::Directory => "password: directory password only",
        PasswordPolicy::App => "password: app passwords only",
        PasswordPolicy::Either => "password: directory or app password",
    }
}

/// The certificate to explain against: what `--cert` names, judged for `user` with the
/// configured client CA; `None` without `--cert`.
fn certificate_from_file(
    config: &crate::config::Config,
    file: Option<&Path>,
    user: &str,
    out: &mut Vec<String>,
) -> anyhow::Result<Option<CertificateStatus>> {
    let Some(file) = file else {
        return Ok(None);
    };
    let chain = crate::tls::load_certs(file, "certificate")?;
    let presented = PresentedCertificate::from_handshake(Some(&chain)).context("the certificate file is empty")?;
    let Some(ca) = &config.tls.client_ca else {
        anyhow::bail!("[tls] client_ca is not set: no certificate counts until it is (see `postern ca init`)");
    };
    let crl = config.tls.client_crl.as_ref().map(|p| config.resolve(p));
    let ca = ClientCa::load(&config.resolve(ca), crl.as_deref())?;
    let status = ca.judge(&presented, user, rustls::pki_types::UnixTime::now());
    match &status {
        CertificateStatus::Valid(id) => say!(out, "certificate {id}: valid for {user}"),
        CertificateStatus::Refused(id, problem) => {
            say!(out, "certificate {id}: refused: {}", Denial::from(*problem))
        }
        CertificateStatus::Absent => {}
    }
    Ok(Some(status))
}

/// Prints the decision for `user` connecting from `ip` over `protocol`, with the client
/// certificate in `cert_file` when given.
pub async fn explain(
    path: &Path,
    user: &str,
    ip: IpAddr,
    protocol: Protocol,
    cert_file: Option<&Path>,
) -> anyhow::Result<()> {
    let config = load_config(path)?;
    let user = normalized(user)?;
    for line in explanation(&config, &user, ip, protocol, cert_file).await? {
        println!("{line}");
    }
    Ok(())
}

/// The explanation of the decision for `user` (normalized) connecting from `ip` over
/// `protocol`, line by line: what `postern access explain` prints and the console shows.
pub async fn explanation(
    config: &Config,
    user: &str,
    ip: IpAddr,
    protocol: Protocol,
    cert_file: Option<&Path>,
) -> anyhow::Result<Vec<String>> {
    let mut lines = Vec::new();
    let out = &mut lines;
    let user = user.to_owned();
    let profiles = Profiles::load(&config.resolve(&config.access.profiles))?;
    say!(out, "{user} from {ip} over {protocol}");
    let given = certificate_from_file(config, cert_file, &user, out)?;
    let in_any = profiles.any_allows(ip);
    say!(
        out,
        "address in any profile with mail access: {}",
        match (in_any, profiles.any_accepts_certificates()) {
            (true, _) => "yes",
            (false, true) => "no (only a valid certificate naming the user gets past this)",
            (false, false) => "no (refused before the directory is asked)",
        }
    );
    if config.tls.client_ca.is_none()
        && profiles.for_user(&user, &[]).iter().any(|p| p.client_cert != CertRequirement::Off)
    {
        say!(out, "client certificates: [tls] client_ca is not set, so no certificate is asked for or counts");
    }
    let directory = Directory::open(&config.directory, &config.base_dir).await?;
    let groups = match directory.lookup(&user).await {
        Ok(entry) => match entry.groups {
            Some(groups) => {
                say!(
                    out,
                    "directory: known; groups: {}",
                    if groups.is_empty() { "-".into() } else { groups.join(", ") }
                );
                Some(groups)
            }
            None => {
                say!(
                    out,
                    "directory: known; groups are only known after a password check, so group profiles are not shown"
                );
                None
            }
        },
        Err(DirectoryError::UnknownUser) => {
            say!(out, "directory: unknown user");
            say!(out, "decision: refused: {}", Denial::UnknownUser);
            return Ok(lines);
        }
        Err(e) => {
            say!(out, "directory: cannot tell ({e}); profiles by user name only");
            None
        }
    };
    let groups_known = groups.is_some();
    let groups = groups.unwrap_or_default();
    let without = CertificateStatus::Absent;
    let certificate = given.as_ref().unwrap_or(&without);
    let evaluation = evaluate(&profiles, &user, &groups, protocol, ip, certificate);
    if evaluation.profiles.is_empty() {
        say!(out, "profiles: none applies to {user}");
    }
    for (profile, verdict) in &evaluation.profiles {
        let protocols = match &profile.protocols {
            None => "all protocols".to_owned(),
            Some(list) => list.iter().map(|p| p.name()).collect::<Vec<_>>().join(", "),
        };
        let verdict = match verdict {
            Verdict::MailAccessOff => "mail access is off".to_owned(),
            Verdict::ProtocolNotCovered => format!("does not cover {protocol}"),
            Verdict::Allows(entry) => match profile.client_cert {
                CertRequirement::Required => format!("allow entry {entry} matches and the certificate is valid"),
                _ => format!("allow entry {entry} matches"),
            },
            Verdict::AllowsByCertificate => {
                format!("no allow entry matches {ip}; the valid certificate lets the client in")
            }
            Verdict::CertificateRefused(denial) => format!("certificate refused: {denial}"),
            Verdict::AddressNotListed => {
                let entries: Vec<String> = profile.allow.iter().map(ToString::to_string).collect();
                format!(
                    "no allow entry matches {ip} (entries: {})",
                    if entries.is_empty() { "none".into() } else { entries.join(", ") }
                )
            }
        };
        let switch = if profile.mail_access { "mail access on" } else { "mail access off" };
        let cert = profile.client_cert.name();
        let password = password_policy(profile.password);
        say!(
            out,
            "profile {:?} ({switch}; {protocols}; client certificate {cert}; {password}): {verdict}",
            profile.name
        );
    }
    let state_dir = config.resolve(&config.server.state_dir);
    let app_passwords = AppPasswords::load(&state_dir)?.list(&user);
    let labels: Vec<String> = app_passwords.iter().map(|l| format!("{:?}", crate::user::escape(&l.label))).collect();
    let asks = evaluation.profiles.iter().any(|(p, _)| p.client_cert != CertRequirement::Off);
    let with = match (&given, asks) {
        (Some(_), _) => " with this certificate",
        (None, true) => " without a certificate",
        (None, false) => "",
    };
    print_decision(with, &evaluation, &labels, out);
    if given.is_none() && asks {
        let id = CertificateId { fingerprint: "-".into(), serial: "-".into() };
        let valid = CertificateStatus::Valid(id);
        let evaluation = evaluate(&profiles, &user, &groups, protocol, ip, &valid);
        print_decision(&format!(" with a valid certificate for {user}"), &evaluation, &labels, out);
    }
    print_route(config, &user, &groups, groups_known, protocol, out);
    if state_dir.join(crate::stores::vault::KEY_FILE).exists() {
        let stored = crate::stores::vault::Vault::open(&state_dir)?.contains(&user);
        say!(out, "upstream credential: {}", if stored { "stored" } else { "missing (the login would be refused)" });
    }
    Ok(lines)
}

/// Prints the route `user` takes and its upstream for `protocol`, with the rule the daemon
/// uses (`upstream::route::RouteMatchers`).
fn print_route(
    config: &Config,
    user: &str,
    groups: &[String],
    groups_known: bool,
    protocol: Protocol,
    out: &mut Vec<String>,
) {
    let matchers = RouteMatchers::from_config(config);
    let (name, upstream) = match matchers.find(user, groups).map(|i| &config.route[i]) {
        Some(route) => (route.name.as_str(), route.upstream(protocol)),
        None => (DEFAULT_ROUTE, config.protocols().find(|(p, _)| *p == protocol).map(|(_, c)| &c.upstream)),
    };
    match upstream {
        Some(u) => {
            let source = match u.upstream_auth {
                UpstreamAuthMode::Password => String::new(),
                UpstreamAuthMode::Xoauth2 => config
                    .oauth
                    .choose(u.oauth_source.as_deref())
                    .map_or_else(String::new, |(name, _)| format!(", token source {name}")),
            };
            say!(out, "route: {name}: {protocol} upstream {} ({}{source})", u.address, u.upstream_auth.as_str());
        }
        None => say!(out, "route: {name}: no upstream for {protocol} (the login would be refused)"),
    }
    if !groups_known && matchers.uses_groups() {
        say!(out, "route: groups unknown, so routes by group were not considered");
    }
}

/// Prints the decision: for the first kind of password a profile lets in, then how the
/// other kind would fare; `labels` are the user's app passwords.
fn print_decision(with: &str, evaluation: &Evaluation<'_>, labels: &[String], out: &mut Vec<String>) {
    if let Err(denial) = &evaluation.decision {
        say!(out, "decision{with}: refused: {denial}");
        return;
    }
    let how = |grant: &Grant| {
        let text = grant.to_string();
        text.strip_prefix(grant.profile.as_str()).unwrap_or_default().to_owned()
    };
    let outcomes = [PasswordKind::Directory, PasswordKind::App].map(|kind| {
        let what = match kind {
            PasswordKind::Directory => "the directory password".to_owned(),
            PasswordKind::App if labels.is_empty() => "an app password (the user has none yet)".to_owned(),
            PasswordKind::App => format!("an app password ({})", labels.join(", ")),
        };
        (what, evaluation.grant(kind))
    });
    let first = outcomes.iter().position(|(_, outcome)| outcome.is_ok()).unwrap_or_default();
    for (index, (what, outcome)) in outcomes.iter().enumerate() {
        match outcome {
            Ok(grant) if index == first => say!(
                out,
                "decision{with}: allowed by profile {:?}{} with {what}, if the password is right",
                grant.profile,
                how(grant)
            ),
            Ok(grant) => say!(out, "  and with {what}: allowed by profile {:?}{}", grant.profile, how(grant)),
            Err(denial) if index == first => say!(out, "decision{with}: {what}: refused: {denial}"),
            Err(denial) => say!(out, "  and with {what}: refused: {denial}"),
        }
    }
}
