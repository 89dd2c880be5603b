//! `postern user app-password add|list|revoke`: per-device app passwords
//! ([`crate::stores::app_passwords`]). A new password is printed once; only its hash is
//! kept. Adding and revoking leave an audit line with who did it; a revocation also asks
//! the running daemon to close the sessions the password opened.

use std::path::Path;

use anyhow::{Context, bail};
use serde_json::json;

use super::control::{self, ControlError};
use super::users::audit_admin;
use super::{load_config, normalized};
use crate::stores::app_passwords::{self, AppPasswords};
use crate::stores::directory::{Directory, DirectoryError};

/// Generates an app password labelled `label` for `user`, stores its hash and prints it.
pub async fn add(path: &Path, user: &str, label: &str) -> anyhow::Result<()> {
    let config = load_config(path)?;
    let user = normalized(user)?;
    let label = app_passwords::valid_label(label)?;
    // Logins with an app password still take the user's groups from the directory.
    let directory = Directory::open(&config.directory, &config.base_dir).await?;
    match directory.lookup(&user).await {
        Ok(_) => {}
        Err(DirectoryError::UnknownUser) => {
            bail!("{user} is not in the directory; add the user there first (app passwords are for directory users)")
        }
        Err(e) => eprintln!("warning: cannot ask the directory whether {user} exists ({e}); adding the app password"),
    }
    let state_dir = config.resolve(&config.server.state_dir);
    let password = app_passwords::generate();
    let (stored_user, stored_label, stored_password) = (user.clone(), label.clone(), password.clone());
    tokio::task::spawn_blocking(move || {
        AppPasswords::update(&state_dir, |passwords| passwords.add(&stored_user, &stored_label, &stored_password))
    })
    .await
    .context("storing the app password")??;
    audit_admin(&config, "app password added", &user, json!({"label": label}));
    println!("{}", password.expose());
    eprintln!(
        "app password {label:?} for {user}: enter it as the password on that one device (dashes and case do not matter); it is not shown again"
    );
    eprintln!(
        "it is accepted where the user's profiles say password = \"app\" or \"either\" (`postern access explain {user} IP` shows which); a running postern applies it within a second"
    );
    Ok(())
}

/// Prints `user`'s app passwords: label, created, last used. Never a password or hash.
pub fn list(path: &Path, user: &str) -> anyhow::Result<()> {
    let config = load_config(path)?;
    let user = normalized(user)?;
    let passwords = AppPasswords::load(&config.resolve(&config.server.state_dir))?;
    let listed = passwords.list(&user);
    if listed.is_empty() {
        println!("{user} has no app passwords; `postern user app-password add {user} --label phone` makes one");
        return Ok(());
    }
    let date = crate::audit::file::rfc3339;
    println!("{:<32} {:<21} last used", "label", "created");
    for l in listed {
        let last = l.last_used.map_or_else(|| "never".to_owned(), date);
        println!("{:<32} {:<21} {last}", crate::user::escape(&l.label), date(l.created));
    }
    Ok(())
}

/// Revokes `user`'s app password labelled `label`, and has the running daemon close the
/// sessions it opened. Without a daemon, the next start no longer knows the password.
pub async fn revoke(path: &Path, user: &str, label: &str) -> anyhow::Result<()> {
    let config = load_config(path)?;
    let user = normalized(user)?;
    let state_dir = config.resolve(&config.server.state_dir);
    let (stored_user, wanted) = (user.clone(), label.to_owned());
    let removed = tokio::task::spawn_blocking(move || {
        AppPasswords::update(&state_dir, |passwords| passwords.revoke(&stored_user, &wanted))
    })
    .await
    .context("revoking the app password")??;
    let Some(label) = removed else {
        bail!(
            "{user} has no app password labelled {:?}; `postern user app-password list {user}` shows them",
            crate::user::escape(label)
        );
    };
    audit_admin(&config, "app password revoked", &user, json!({"label": label}));
    let socket = config.control_socket();
    let request = json!({"command": "revoke-app-password", "user": user, "label": label});
    match control::request(&socket, &request).await {
        Ok(answer) if answer["ok"] == json!(true) => {
            let closed = answer["sessions_closed"].as_u64().unwrap_or(0);
            println!("revoked the app password {label:?} of {user}; closed {closed} live session(s) that used it");
        }
        Ok(answer) => {
            println!("revoked the app password {label:?} of {user}");
            eprintln!(
                "the running daemon said: {}; it applies the change to the file within a second, and closes the sessions then",
                answer["error"].as_str().unwrap_or("no reason given")
            );
        }
        Err(ControlError::Connect { path, .. }) => {
            println!("revoked the app password {label:?} of {user}");
            eprintln!(
                "no daemon answers at {} (not running, or another config): it is refused from the next start",
                path.display()
            );
        }
        Err(e) => {
            println!("revoked the app password {label:?} of {user}");
            eprintln!("{e}; the daemon applies the change to the file within a second, and closes the sessions then");
        }
    }
    Ok(())
}
