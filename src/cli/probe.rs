//! `postern probe USER`: logs in upstream exactly as a client login would once the directory
//! said yes (the same route, credential choice, `upstream_auth` and OAuth2 source), and
//! reports the upstream's verdict.

use std::path::Path;

use anyhow::bail;

use super::{load_config, normalized};
use crate::config::UpstreamAuthMode;
use crate::protocol::Protocol;
use crate::stores::vault::Vault;
use crate::upstream::UpstreamAuth;
use crate::upstream::credential::{LoginError, Upstreams};

/// Prints `OK` when the upstream accepts `user`'s credential over `protocol`; otherwise
/// prints what went wrong and fails. A refusal prints the upstream's answer; an upstream
/// that cannot be reached, or a credential that cannot be built, says so instead.
pub async fn probe(path: &Path, user: &str, protocol: Protocol) -> anyhow::Result<()> {
    let config = load_config(path)?;
    let user = normalized(user)?;
    if config.protocols().all(|(p, _)| p != protocol) {
        bail!("{protocol} is not configured in {}", path.display());
    }
    let vault = Vault::open(&config.resolve(&config.server.state_dir))?;
    let upstreams = Upstreams::from_config(&config, vault)?;
    let routing = upstreams.routing();
    let groups = if routing.uses_groups() { groups_of(&config, &user).await? } else { Vec::new() };
    let route = routing.resolve(&user, &groups);
    let Some(target) = route.target(protocol) else {
        bail!("{user} takes route {}, which has no upstream for {protocol}: logins would be refused", route.name());
    };
    let upstream = &target.upstream;
    let address = upstream.address().to_owned();
    let mode = upstream.auth_mode();
    let route_name = route.name();
    match upstreams.login(route, protocol, &user, "", None, None, &|_| {}).await {
        Ok(mut logged_in) => {
            let _ = tokio::io::AsyncWriteExt::shutdown(&mut logged_in.stream).await;
            println!("OK: {address} accepted the {} credential of {user} (route {route_name})", mode.as_str());
            Ok(())
        }
        Err(LoginError::Refused { answer, .. }) => {
            println!("{answer}");
            if let Some(previous) = upstreams.vault().previous(&user)? {
                // A rotation in progress: does the upstream still hold the old password?
                let auth = UpstreamAuth::Password {
                    user: previous.upstream_user.unwrap_or_else(|| user.clone()),
                    password: previous.secret,
                };
                if mode == UpstreamAuthMode::Password && upstream.login(&auth, None, None).await.is_ok() {
                    eprintln!("the previous (rotated) secret still works: set the new one on the upstream account");
                }
            }
            bail!("{address} (route {route_name}) refused the {} credential of {user}", mode.as_str())
        }
        Err(LoginError::NoCredential) => {
            bail!("no upstream credential is stored for {user}: store one with `postern user set-upstream {user}`")
        }
        Err(LoginError::Unreachable { source, .. }) => {
            bail!(
                "cannot log in to {address} (route {route_name}): {source}; the credential was not tried (check the upstream address and the network)"
            )
        }
        Err(other) => bail!("cannot build the upstream credential of {user}: {other}"),
    }
}

/// The user's directory groups, for routes that match by group; a directory that tells groups
/// only after a password check gives none (and says so).
async fn groups_of(config: &crate::config::Config, user: &str) -> anyhow::Result<Vec<String>> {
    let directory = crate::stores::directory::Directory::open(&config.directory, &config.base_dir).await?;
    match directory.lookup(user).await {
        Ok(entry) => Ok(entry.groups.unwrap_or_else(|| {
            eprintln!("the directory tells groups only after a password check: routes by group are not considered");
            Vec::new()
        })),
        Err(e) => bail!("cannot look up {user}'s groups for the routes that match by group: {e}"),
    }
}
