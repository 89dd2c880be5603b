//! `postern probe USER`: logs in upstream with the stored credential, exactly as a session
//! would, and reports the upstream's verdict.

use std::path::Path;

use anyhow::bail;

use super::{load_config, normalized};
use crate::protocol::Protocol;
use crate::upstream::{Upstream, UpstreamAuth, UpstreamError};
use crate::vault::{SecretKind, UpstreamSecret, Vault};

async fn try_login(upstream: &Upstream, user: &str, stored: UpstreamSecret) -> Result<(), UpstreamError> {
    if stored.kind != SecretKind::Password {
        return Err(UpstreamError::Protocol("the stored credential is an OAuth2 refresh token; probing it needs a token endpoint".into()));
    }
    let auth = UpstreamAuth::Password {
        user: stored.upstream_user.unwrap_or_else(|| user.to_owned()),
        password: stored.secret,
    };
    let mut logged_in = upstream.login(&auth, None).await?;
    let _ = tokio::io::AsyncWriteExt::shutdown(&mut logged_in.stream).await;
    Ok(())
}

/// Prints `OK` when the upstream accepts `user`'s stored credential over `protocol`, or the
/// upstream's answer (and fails) when not.
pub async fn probe(path: &Path, user: &str, protocol: Protocol) -> anyhow::Result<()> {
    let config = load_config(path)?;
    let user = normalized(user)?;
    let Some((_, settings)) = config.protocols().find(|(p, _)| *p == protocol) else {
        bail!("{protocol} is not configured in {}", path.display());
    };
    let ca = settings.upstream_ca_file.as_ref().map(|f| config.resolve(f));
    let upstream = Upstream::new(protocol, settings, ca.as_deref(), &config.server.hostname, config.limits.upstream_timeout())?;
    let vault = Vault::open(&config.resolve(&config.server.state_dir))?;
    let Some(stored) = vault.get(&user)? else {
        bail!("no upstream credential is stored for {user}");
    };
    match try_login(&upstream, &user, stored).await {
        Ok(()) => {
            println!("OK: {} accepted the stored credential of {user}", upstream.address());
            Ok(())
        }
        Err(e) => {
            match &e {
                UpstreamError::Refused(answer) => println!("{answer}"),
                other => println!("{other}"),
            }
            if let Some(previous) = vault.previous(&user)? {
                if try_login(&upstream, &user, previous).await.is_ok() {
                    eprintln!("the previous (rotated) secret still works: set the new one on the upstream account");
                }
            }
            bail!("{} did not accept the stored credential of {user}: {e}", upstream.address())
        }
    }
}
