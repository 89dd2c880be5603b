//! `postern access explain USER IP`: the password-free part of the access decision, spelled
//! out: which profiles apply to the user, why each does or does not let the address in, and
//! which password each accepts. It runs the decision's own evaluation
//! (`access::decision::evaluate`).

use std::net::IpAddr;
use std::path::Path;

use super::{load_config, normalized};
use crate::access::decision::{Denial, Verdict, evaluate};
use crate::access::profiles::{PasswordKind, PasswordPolicy, Profiles};
use crate::protocol::Protocol;
use crate::stores::app_passwords::AppPasswords;
use crate::stores::directory::{Directory, DirectoryError};

/// What a profile's `password` setting means, for the explanation.
fn password_policy(policy: PasswordPolicy) -> &'static str {
    match policy {
        PasswordPolicy::Directory => "password: directory password only",
        PasswordPolicy::App => "password: app passwords only",
        PasswordPolicy::Either => "password: directory or app password",
    }
}

/// Prints the decision for `user` connecting from `ip` over `protocol`.
pub async fn explain(path: &Path, user: &str, ip: IpAddr, protocol: Protocol) -> anyhow::Result<()> {
    let config = load_config(path)?;
    let user = normalized(user)?;
    let profiles = Profiles::load(&config.resolve(&config.access.profiles))?;
    println!("{user} from {ip} over {protocol}");
    println!(
        "address in any profile with mail access: {}",
        if profiles.any_allows(ip) { "yes" } else { "no (refused before the directory is asked)" }
    );
    let directory = Directory::open(&config.directory, &config.base_dir).await?;
    let groups = match directory.lookup(&user).await {
        Ok(entry) => match entry.groups {
            Some(groups) => {
                println!(
                    "directory: known; groups: {}",
                    if groups.is_empty() { "-".into() } else { groups.join(", ") }
                );
                Some(groups)
            }
            None => {
                println!(
                    "directory: known; groups are only known after a password check, so group profiles are not shown"
                );
                None
            }
        },
        Err(DirectoryError::UnknownUser) => {
            println!("directory: unknown user");
            println!("decision: refused: {}", Denial::UnknownUser);
            return Ok(());
        }
        Err(e) => {
            println!("directory: cannot tell ({e}); profiles by user name only");
            None
        }
    };
    let groups = groups.unwrap_or_default();
    let evaluation = evaluate(&profiles, &user, &groups, protocol, ip);
    if evaluation.profiles.is_empty() {
        println!("profiles: none applies to {user}");
    }
    for (profile, verdict) in &evaluation.profiles {
        let protocols = match &profile.protocols {
            None => "all protocols".to_owned(),
            Some(list) => list.iter().map(|p| p.name()).collect::<Vec<_>>().join(", "),
        };
        let verdict = match verdict {
            Verdict::MailAccessOff => "mail access is off".to_owned(),
            Verdict::ProtocolNotCovered => format!("does not cover {protocol}"),
            Verdict::Allows(entry) => format!("allow entry {entry} matches"),
            Verdict::AddressNotListed => {
                let entries: Vec<String> = profile.allow.iter().map(ToString::to_string).collect();
                format!(
                    "no allow entry matches {ip} (entries: {})",
                    if entries.is_empty() { "none".into() } else { entries.join(", ") }
                )
            }
        };
        let switch = if profile.mail_access { "mail access on" } else { "mail access off" };
        let password = password_policy(profile.password);
        println!("profile {:?} ({switch}; {protocols}; {password}): {verdict}", profile.name);
    }
    let state_dir = config.resolve(&config.server.state_dir);
    let app_passwords = AppPasswords::load(&state_dir)?.list(&user);
    let labels: Vec<String> = app_passwords.iter().map(|l| format!("{:?}", crate::user::escape(&l.label))).collect();
    match &evaluation.decision {
        Ok(_) => {
            // The first kind a profile lets in is the decision; the other kind's outcome follows.
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
                let prefix = if index == first { "decision:" } else { "  and with" };
                match outcome {
                    Ok(grant) if index == first => println!(
                        "{prefix} allowed by profile {:?} ({}) with {what}, if the password is right",
                        grant.profile, grant.entry
                    ),
                    Ok(grant) => println!("{prefix} {what}: allowed by profile {:?} ({})", grant.profile, grant.entry),
                    Err(denial) => println!("{prefix} {what}: refused: {denial}"),
                }
            }
        }
        Err(denial) => println!("decision: refused: {denial}"),
    }
    if state_dir.join(crate::stores::vault::KEY_FILE).exists() {
        let stored = crate::stores::vault::Vault::open(&state_dir)?.contains(&user);
        println!("upstream credential: {}", if stored { "stored" } else { "missing (the login would be refused)" });
    }
    Ok(())
}
