//! The users page: per user, the upstream credential (kind, when set, a rotation waiting
//! for confirmation), the last upstream login result, and a lock; and the admin commands'
//! actions on them: unlock, generate (shown once) or set an upstream password, confirm a
//! rotation, remove, probe the upstream with the stored credential, and add (shown once)
//! or revoke per-device app passwords.

use std::collections::BTreeMap;
use std::sync::Arc;

use askama::Template;
use axum::extract::State;
use axum::response::Response;

use super::Console;
use super::auth::Admin;
use super::page::{self, Message, Nav};
use crate::audit::file::rfc3339;
use crate::protocol::Protocol;
use crate::secret::Secret;
use crate::stores::vault::{self, UpstreamSecret, Vault, VaultError};

/// One row of the users table.
pub struct Row {
    user: String,
    credential: String,
    apps: Vec<String>,
    last: String,
    locked: String,
}

#[derive(Template)]
#[template(path = "console/users.html")]
struct UsersPage {
    nav: Option<Nav>,
    rows: Vec<Row>,
    csrf: String,
    error: String,
}

/// `GET /users`.
pub async fn list(State(console): State<Arc<Console>>, admin: Admin) -> Response {
    let mut rows: BTreeMap<String, Row> = BTreeMap::new();
    let mut error = String::new();
    let row = |user: &str| Row {
        user: user.to_owned(),
        credential: "none".into(),
        apps: Vec::new(),
        last: "-".into(),
        locked: "no".into(),
    };
    match Vault::open(&console.state_dir()) {
        Ok(vault) => {
            for entry in vault.list() {
                let mut r = row(&entry.user);
                r.credential = format!(
                    "{}{}, set {}{}",
                    entry.kind.as_str(),
                    entry.upstream_user.map(|u| format!(" as {u}")).unwrap_or_default(),
                    rfc3339(entry.changed),
                    if entry.has_previous { " (rotation waiting for confirmation)" } else { "" }
                );
                rows.insert(entry.user, r);
            }
        }
        Err(e) => error = format!("The vault cannot be read: {e}"),
    }
    match console.state.counters.locked_users().await {
        Ok(locked) => {
            for lock in locked {
                let r = rows.entry(lock.user.clone()).or_insert_with(|| row(&lock.user));
                r.locked = match lock.remaining {
                    Some(left) => format!("for {} more seconds", left.as_secs()),
                    None => "until an admin unlocks".into(),
                };
            }
        }
        Err(e) => error = format!("The lockout store cannot be read: {e}"),
    }
    let app_passwords = console.state.app_passwords();
    for r in rows.values_mut() {
        r.apps = app_passwords
            .list(&r.user)
            .into_iter()
            .map(|l| {
                let used = l.last_used.map_or_else(|| "never used".to_owned(), |t| format!("last used {}", rfc3339(t)));
                format!("{} ({used})", l.label)
            })
            .collect();
        if let Some(last) = console.state.last_results().get(&r.user) {
            r.last = format!(
                "{} {} {}: {}",
                rfc3339(last.at),
                last.protocol,
                if last.ok { "ok" } else { "failed" },
                last.message
            );
        }
    }
    page::html(&UsersPage {
        nav: admin.nav("users"),
        rows: rows.into_values().collect(),
        csrf: admin.csrf.clone(),
        error,
    })
}

/// An action's form.
#[derive(serde::Deserialize)]
pub struct ActionForm {
    #[serde(default)]
    op: String,
    #[serde(default)]
    user: String,
    #[serde(default)]
    secret: String,
    #[serde(default)]
    protocol: String,
    #[serde(default)]
    label: String,
    #[serde(default)]
    confirm: Option<String>,
    #[serde(default)]
    csv: String,
    #[serde(default)]
    csrf: String,
}

/// Runs a vault change under the vault's write lock, off the async threads.
async fn vault_change<T: Send + 'static>(
    console: &Console,
    change: impl FnOnce(&mut Vault) -> Result<T, VaultError> + Send + 'static,
) -> Result<T, String> {
    let state_dir = console.state_dir();
    let result = tokio::task::spawn_blocking(move || {
        Vault::init(&state_dir)?;
        Vault::update(&state_dir, change)
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e: VaultError| e.to_string())?;
    console.reload_vault().await.map_err(|e| e.to_string())?;
    Ok(result)
}

/// `POST /users/action`.
pub async fn action(
    State(console): State<Arc<Console>>,
    admin: Admin,
    axum::Form(form): axum::Form<ActionForm>,
) -> Response {
    if let Some(refused) = admin.csrf_refusal(&form.csrf) {
        return refused;
    }
    match form.op.as_str() {
        "export" => return export(&console, &admin, form.confirm.is_some()),
        "import" => return import(&console, &admin, &form.csv, form.confirm.is_some()).await,
        _ => {}
    }
    let user = match crate::user::normalize(&form.user) {
        Ok(user) => user,
        Err(e) => {
            return page::result(admin.nav(""), false, format!("Not a usable user name: {e}"), String::new(), "/users");
        }
    };
    let done = |ok: bool, event: &str, message: String, details: String| {
        console.audit(&admin.name, admin.ip, event, &user, if ok { "ok" } else { "failed" });
        page::result(admin.nav(""), ok, message, details, "/users")
    };
    match form.op.as_str() {
        "unlock" => match console.state.counters.unlock(&user).await {
            Ok(true) => {
                let by = format!("console:{}", admin.name);
                console.state.alerts.emit(crate::alerts::Event::UserUnlocked { user: user.clone(), by });
                done(true, "console_unlock", format!("Unlocked {user}."), String::new())
            }
            Ok(false) => done(false, "console_unlock", format!("{user} was not locked."), String::new()),
            Err(e) => done(false, "console_unlock", "The lockout store is unavailable.".into(), e.to_string()),
        },
        "generate" => {
            let secret = vault::generate_password();
            let stored = secret.clone();
            let who = user.clone();
            let result = vault_change(&console, move |vault| {
                if vault.rotate_secret(&who, stored.clone())? {
                    Ok(true)
                } else {
                    vault.set(&who, UpstreamSecret::password(stored)).map(|()| false)
                }
            })
            .await;
            match result {
                Ok(rotated) => {
                    console.audit(&admin.name, admin.ip, "console_upstream_generated", &user, "ok");
                    let message = if rotated {
                        format!(
                            "Generated a new upstream password for {user}. Set it on the upstream account now, then confirm the rotation on the users page (the previous one is kept until then)."
                        )
                    } else {
                        format!(
                            "Generated and stored an upstream password for {user}. Set it on the upstream account now."
                        )
                    };
                    page::html(&Message {
                        nav: admin.nav("users"),
                        title: "Upstream password".into(),
                        class: "ok",
                        message,
                        secret: Some(secret.expose().to_owned()),
                        details: String::new(),
                        back: "/users",
                    })
                }
                Err(e) => done(false, "console_upstream_generated", "The vault was not changed.".into(), e),
            }
        }
        "set" => {
            let secret = Secret::new(form.secret);
            if secret.is_empty() {
                return done(false, "console_upstream_set", "Give the password to store.".into(), String::new());
            }
            let who = user.clone();
            match vault_change(&console, move |vault| {
                let upstream_user = vault.get(&who)?.and_then(|e| e.upstream_user);
                let mut entry = UpstreamSecret::password(secret);
                if let Some(name) = upstream_user {
                    entry = entry.with_upstream_user(name);
                }
                vault.set(&who, entry)
            })
            .await
            {
                Ok(()) => done(
                    true,
                    "console_upstream_set",
                    format!("Stored the upstream password for {user}."),
                    String::new(),
                ),
                Err(e) => done(false, "console_upstream_set", "The vault was not changed.".into(), e),
            }
        }
        "rotate" => {
            let secret = Secret::new(form.secret);
            if secret.is_empty() {
                return done(
                    false,
                    "console_upstream_rotated",
                    "Give the new upstream password.".into(),
                    String::new(),
                );
            }
            let who = user.clone();
            match vault_change(&console, move |vault| vault.rotate_secret(&who, secret)).await {
                Ok(true) => done(
                    true,
                    "console_upstream_rotated",
                    format!("Rotated the upstream password of {user}; the previous one is kept until you confirm."),
                    String::new(),
                ),
                Ok(false) => done(
                    false,
                    "console_upstream_rotated",
                    format!("{user} has no upstream password to rotate; store one instead."),
                    String::new(),
                ),
                Err(e) => done(false, "console_upstream_rotated", "The vault was not changed.".into(), e),
            }
        }
        "confirm" => {
            let who = user.clone();
            match vault_change(&console, move |vault| vault.confirm(&who)).await {
                Ok(true) => done(
                    true,
                    "console_rotation_confirmed",
                    format!("Confirmed; the previous upstream password of {user} is forgotten."),
                    String::new(),
                ),
                Ok(false) => done(
                    false,
                    "console_rotation_confirmed",
                    format!("{user} has no rotation waiting for confirmation."),
                    String::new(),
                ),
                Err(e) => done(false, "console_rotation_confirmed", "The vault was not changed.".into(), e),
            }
        }
        "remove" if form.confirm.is_none() => page::result(
            admin.nav(""),
            false,
            format!("Tick \"sure\" beside Remove to remove {user}."),
            String::new(),
            "/users",
        ),
        "remove" => {
            let config = console.config();
            let who = user.clone();
            let removed = tokio::task::spawn_blocking(move || crate::stores::remove_user(&config, &who)).await;
            match removed.map_err(|e| e.to_string()).and_then(|r| r.map_err(|e| e.to_string())) {
                Ok(removed) if removed.is_empty() => {
                    done(false, "console_remove", format!("{user} is not known."), String::new())
                }
                Ok(removed) => {
                    let _ = console.reload_vault().await;
                    done(
                        true,
                        "console_remove",
                        format!("Removed {user}: {}; their live sessions are closed.", removed.join(" and ")),
                        String::new(),
                    )
                }
                Err(e) => done(false, "console_remove", "Nothing was removed.".into(), e),
            }
        }
        "authorize" => authorize(&console, &admin, &user).await,
        "probe" => {
            let protocol = match form.protocol.as_str() {
                "pop3" => Protocol::Pop3,
                "smtp" => Protocol::Smtp,
                _ => Protocol::Imap,
            };
            let (ok, message, details) = probe(&console, &user, protocol).await;
            done(ok, "console_probe", message, details)
        }
        "directory_password" => {
            let config = console.config();
            let crate::stores::directory::DirectoryConfig::File(file) = &config.directory else {
                return done(
                    false,
                    "console_directory_password",
                    "The directory is LDAP: change the password in the directory itself.".into(),
                    String::new(),
                );
            };
            let password = Secret::new(form.secret);
            if password.is_empty() {
                return done(
                    false,
                    "console_directory_password",
                    "Give the new directory password.".into(),
                    String::new(),
                );
            }
            let path = config.resolve(&file.path);
            let who = user.clone();
            let set = tokio::task::spawn_blocking(move || {
                crate::stores::directory::file::set_password(&path, &who, &password)
            })
            .await;
            match set.map_err(|e| e.to_string()).and_then(|r| r.map_err(|e| e.to_string())) {
                Ok(()) => {
                    if let Err(e) = console.state.reload_directory(&config).await {
                        return done(
                            false,
                            "console_directory_password",
                            "The password was set but the directory could not be opened again; reload the daemon."
                                .into(),
                            e.to_string(),
                        );
                    }
                    done(
                        true,
                        "console_directory_password",
                        format!("Set the directory password of {user}."),
                        String::new(),
                    )
                }
                Err(e) => done(false, "console_directory_password", "The password was not set.".into(), e),
            }
        }
        "reveal" => {
            let vault = match Vault::open(&console.state_dir()) {
                Ok(vault) => vault,
                Err(e) => return done(false, "console_reveal", "The vault cannot be read.".into(), e.to_string()),
            };
            match vault.get(&user) {
                Ok(Some(stored)) => {
                    // Audited before anything is shown, as the command does.
                    console.audit(&admin.name, admin.ip, "console_reveal", &user, "upstream secret shown");
                    page::html(&Message {
                        nav: admin.nav("users"),
                        title: "Upstream secret".into(),
                        class: "ok",
                        message: format!(
                            "The stored {} of {user} (upstream login {}). This reveal is in the audit log.",
                            stored.kind.as_str(),
                            stored.upstream_user.as_deref().unwrap_or(&user)
                        ),
                        secret: Some(stored.secret.expose().to_owned()),
                        details: String::new(),
                        back: "/users",
                    })
                }
                Ok(None) => done(
                    false,
                    "console_reveal",
                    format!("No upstream credential is stored for {user}."),
                    String::new(),
                ),
                Err(e) => done(false, "console_reveal", "The vault cannot be read.".into(), e.to_string()),
            }
        }
        "app_add" => {
            let label = match crate::stores::app_passwords::valid_label(&form.label) {
                Ok(label) => label,
                Err(e) => {
                    return done(
                        false,
                        "console_app_password_added",
                        format!("Not a usable label: {e}"),
                        String::new(),
                    );
                }
            };
            if let Err(crate::stores::directory::DirectoryError::UnknownUser) =
                console.state.directory().lookup(&user).await
            {
                return done(
                    false,
                    "console_app_password_added",
                    format!("{user} is not in the directory; app passwords are for directory users."),
                    String::new(),
                );
            }
            let password = crate::stores::app_passwords::generate();
            let (who, what, stored) = (user.clone(), label.clone(), password.clone());
            let state_dir = console.state_dir();
            let added = tokio::task::spawn_blocking(move || {
                crate::stores::app_passwords::AppPasswords::update(&state_dir, |p| p.add(&who, &what, &stored))
            })
            .await;
            match added.map_err(|e| e.to_string()).and_then(|r| r.map_err(|e| e.to_string())) {
                Ok(()) => {
                    let _ = console.state.reload_app_passwords();
                    console.audit(
                        &admin.name,
                        admin.ip,
                        "console_app_password_added",
                        &user,
                        &format!("label {label}"),
                    );
                    page::html(&Message {
                        nav: admin.nav("users"),
                        title: "App password".into(),
                        class: "ok",
                        message: format!(
                            "App password {label:?} for {user}: enter it as the password on that one device (dashes and case do not matter)."
                        ),
                        secret: Some(password.expose().to_owned()),
                        details: String::new(),
                        back: "/users",
                    })
                }
                Err(e) => done(false, "console_app_password_added", "No app password was added.".into(), e),
            }
        }
        "app_revoke" => {
            let (who, what) = (user.clone(), form.label.clone());
            let state_dir = console.state_dir();
            let revoked = tokio::task::spawn_blocking(move || {
                crate::stores::app_passwords::AppPasswords::update(&state_dir, |p| p.revoke(&who, &what))
            })
            .await;
            match revoked.map_err(|e| e.to_string()).and_then(|r| r.map_err(|e| e.to_string())) {
                Ok(Some(label)) => {
                    let _ = console.state.reload_app_passwords();
                    let reason = format!("closed: app password {label:?} revoked by {} in the console", admin.name);
                    let closed = console.state.live().revoke_app_password(&user, &label, &reason);
                    console.audit(
                        &admin.name,
                        admin.ip,
                        "console_app_password_revoked",
                        &user,
                        &format!("label {label}"),
                    );
                    page::result(
                        admin.nav(""),
                        true,
                        format!(
                            "Revoked {user}'s app password {label:?}; closed {closed} live session(s) that used it."
                        ),
                        String::new(),
                        "/users",
                    )
                }
                Ok(None) => done(
                    false,
                    "console_app_password_revoked",
                    format!("{user} has no app password labelled {:?}.", form.label),
                    String::new(),
                ),
                Err(e) => done(false, "console_app_password_revoked", "Nothing was revoked.".into(), e),
            }
        }
        other => page::result(admin.nav(""), false, format!("Unknown action {other:?}."), String::new(), "/users"),
    }
}

/// Logs in upstream with `user`'s stored credential through their route, as a client login
/// would; what the upstream answered.
async fn probe(console: &Console, user: &str, protocol: Protocol) -> (bool, String, String) {
    let routing = console.state.upstreams.routing();
    let groups = if routing.uses_groups() {
        console.state.directory().lookup(user).await.ok().and_then(|e| e.groups).unwrap_or_default()
    } else {
        Vec::new()
    };
    let route = routing.resolve(user, &groups);
    let Some(address) = route.address(protocol).map(str::to_owned) else {
        return (false, format!("{user}'s route {} has no {protocol} upstream.", route.name()), String::new());
    };
    match console.state.upstreams.login(route, protocol, user, "", None, None, &|_| {}).await {
        Ok(mut logged_in) => {
            let _ = tokio::io::AsyncWriteExt::shutdown(&mut logged_in.stream).await;
            (
                true,
                format!("{address} (route {}) accepted the stored credential of {user}.", route.name()),
                String::new(),
            )
        }
        Err(e) => (false, format!("{address} (route {}) did not log {user} in.", route.name()), e.to_string()),
    }
}

/// The vault as CSV, the secrets only with `reveal` (audited first, for every user in it).
fn export(console: &Console, admin: &Admin, reveal: bool) -> Response {
    let vault = match Vault::open(&console.state_dir()) {
        Ok(vault) => vault,
        Err(e) => {
            return page::result(admin.nav(""), false, "The vault cannot be read.".into(), e.to_string(), "/users");
        }
    };
    if reveal {
        for listing in vault.list() {
            console.audit(&admin.name, admin.ip, "console_reveal", &listing.user, "exported with the secret");
        }
    }
    match crate::stores::credentials_csv::export(&vault, reveal) {
        Ok(text) => {
            console.audit(
                &admin.name,
                admin.ip,
                "console_export",
                "",
                if reveal { "with secrets" } else { "without secrets" },
            );
            let headers = [
                (axum::http::header::CONTENT_TYPE, "text/csv; charset=utf-8"),
                (axum::http::header::CONTENT_DISPOSITION, "attachment; filename=\"postern-upstream-credentials.csv\""),
            ];
            axum::response::IntoResponse::into_response((headers, text.expose().to_owned()))
        }
        Err(e) => page::result(admin.nav(""), false, "The vault cannot be read.".into(), e.to_string(), "/users"),
    }
}

/// Stores upstream passwords from CSV; nothing is written if a row is bad, unless
/// `skip_invalid`.
async fn import(console: &Console, admin: &Admin, text: &str, skip_invalid: bool) -> Response {
    let (rows, rejected) = match crate::stores::credentials_csv::validate(text) {
        Ok(parts) => parts,
        Err(e) => return page::result(admin.nav(""), false, "Nothing was imported.".into(), e.to_string(), "/users"),
    };
    if !rejected.is_empty() && !skip_invalid {
        let message = format!(
            "{} row(s) valid, {} rejected; nothing was written. Fix the rows, or tick \"store the valid rows\".",
            rows.len(),
            rejected.len()
        );
        return page::result(admin.nav(""), false, message, rejected.join("\n"), "/users");
    }
    let count = rows.len();
    let users: Vec<String> = rows.iter().map(|r| r.user.clone()).collect();
    // How many rows are stored, so that a failure part way still audits the ones written.
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = done.clone();
    let stored = vault_change(console, move |vault| {
        let progress = |n: usize| counted.store(n, std::sync::atomic::Ordering::Relaxed);
        crate::stores::credentials_csv::store(vault, &rows, progress).map_err(|(_, e)| e)
    })
    .await;
    for user in &users[..done.load(std::sync::atomic::Ordering::Relaxed).min(users.len())] {
        console.audit(&admin.name, admin.ip, "console_import", user, "stored");
    }
    match stored {
        Ok(()) => page::result(
            admin.nav(""),
            true,
            format!("Imported {count} row(s); rejected {}.", rejected.len()),
            rejected.join("\n"),
            "/users",
        ),
        Err(e) => page::result(
            admin.nav(""),
            false,
            "The import stopped; rows before the failure are stored.".into(),
            e,
            "/users",
        ),
    }
}

/// Starts the OAuth2 device enrolment of `user` (RFC 8628, as `postern user authorize`
/// does): shows the page and code to give the mailbox's owner; the polling goes on in the
/// background, and an approval stores the refresh token (audited either way).
async fn authorize(console: &Arc<Console>, admin: &Admin, user: &str) -> Response {
    let source = match crate::stores::oauth::TokenSource::chosen(&console.config(), None) {
        Ok(source) => source,
        Err(e) => {
            return page::result(
                admin.nav(""),
                false,
                "No device enrolment is possible.".into(),
                e.to_string(),
                "/users",
            );
        }
    };
    if !console.enrolling.lock().unwrap_or_else(|e| e.into_inner()).insert(user.to_owned()) {
        let message =
            format!("An enrolment of {user} is already waiting for approval; give its code, or wait until it expires.");
        return page::result(admin.nav(""), false, message, String::new(), "/users");
    }
    let (codes_tx, codes_rx) = tokio::sync::oneshot::channel();
    let (console_bg, admin_name, admin_ip, who) = (console.clone(), admin.name.clone(), admin.ip, user.to_owned());
    tokio::spawn(async move {
        let announce = move |codes: &crate::stores::oauth::device::DeviceAuthorization| {
            let page = codes.verification_uri_complete.clone().unwrap_or_else(|| codes.verification_uri.clone());
            let _ = codes_tx.send((page, codes.user_code.clone(), codes.expires_in));
        };
        let result = match source.authorize_device(announce).await {
            Ok(token) => {
                let stored = who.clone();
                vault_change(&console_bg, move |vault| vault.set_refresh_token(&stored, token)).await
            }
            Err(e) => Err(e.to_string()),
        };
        let outcome = match &result {
            Ok(()) => "refresh token stored".to_owned(),
            Err(e) => format!("failed: {e}"),
        };
        console_bg.audit(&admin_name, admin_ip, "console_authorize", &who, &outcome);
        console_bg.enrolling.lock().unwrap_or_else(|e| e.into_inner()).remove(&who);
    });
    match tokio::time::timeout(std::time::Duration::from_secs(30), codes_rx).await {
        Ok(Ok((page, code, expires))) => {
            console.audit(&admin.name, admin.ip, "console_authorize_started", user, "code shown");
            page::html(&Message {
                nav: admin.nav("users"),
                title: "OAuth2 enrolment".into(),
                class: "ok",
                message: format!(
                    "Have {user}'s owner open {page} and enter the code below within {} minutes. The refresh token is stored as soon as they approve (the users page then shows it); the audit log records the outcome.",
                    expires.as_secs() / 60
                ),
                secret: Some(code),
                details: String::new(),
                back: "/users",
            })
        }
        _ => page::result(
            admin.nav(""),
            false,
            "The authorization server did not hand out a code; see the audit log for why.".into(),
            String::new(),
            "/users",
        ),
    }
}
