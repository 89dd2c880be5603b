//! `postern access explain USER IP`: the password-free part of the access decision, spelled
//! out: which profiles apply to the user and why each does or does not let the address in,
//! and which route (upstream) the login would take.
//! It runs the decision's own evaluation (`access::decision::evaluate`).

use std::net::IpAddr;
use std::path::Path;

use super::{load_config, normalized};
use crate::access::decision::{Denial, Verdict, evaluate};
use crate::access::profiles::Profiles;
use crate::config::{Config, UpstreamAuthMode};
use crate::protocol::Protocol;
use crate::stores::directory::{Directory, DirectoryError};
use crate::upstream::route::{DEFAULT_ROUTE, RouteMatchers};

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
    let groups_known = groups.is_some();
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
        println!("profile {:?} ({switch}; {protocols}): {verdict}", profile.name);
    }
    match evaluation.decision {
        Ok(grant) => {
            println!("decision: allowed by profile {:?} ({}), if the password is right", grant.profile, grant.entry)
        }
        Err(denial) => println!("decision: refused: {denial}"),
    }
    print_route(&config, &user, &groups, groups_known, protocol);
    let state_dir = config.resolve(&config.server.state_dir);
    if state_dir.join(crate::stores::vault::KEY_FILE).exists() {
        let stored = crate::stores::vault::Vault::open(&state_dir)?.contains(&user);
        println!("upstream credential: {}", if stored { "stored" } else { "missing (the login would be refused)" });
    }
    Ok(())
}

/// Prints the route `user` takes and its upstream for `protocol`, with the rule the daemon
/// uses (`upstream::route::RouteMatchers`).
fn print_route(config: &Config, user: &str, groups: &[String], groups_known: bool, protocol: Protocol) {
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
            println!("route: {name}: {protocol} upstream {} ({}{source})", u.address, u.upstream_auth.as_str());
        }
        None => println!("route: {name}: no upstream for {protocol} (the login would be refused)"),
    }
    if !groups_known && matchers.uses_groups() {
        println!("route: groups unknown, so routes by group were not considered");
    }
}
