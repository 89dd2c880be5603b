//! The daemon's side of the control socket: a Unix socket (mode 0600) where `postern
//! status` and other admin commands (`crate::cli::control`) ask the running daemon questions. One JSON request per line, one JSON answer
//! per line:
//!
//! ```text
//! {"command":"status"}                 -> uptime, sessions per protocol, reloads
//! {"command":"user","user":"a@x"}      -> the user's last upstream login result
//! {"command":"reload"}                 -> what SIGHUP does, with the result
//! {"command":"unlock","user":"a@x"}    -> lifts the user's lockout; says whether it was locked
//! {"command":"revoke-app-password","user":"a@x","label":"phone"}
//!                                      -> re-reads the app passwords and closes that one's
//!                                         live sessions; says how many
//! ```
//!
//! Answers always carry `"ok": true|false`; failures carry `"error"`.

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::alerts::Event;
use crate::protocol::Protocol;
use crate::state::State;

/// Most bytes read from one control connection; requests are tiny.
const MAX_CONNECTION_INPUT: u64 = 64 * 1024;

/// How long a client may take to send its request or read the answer.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// A reload asked for over the socket; the daemon answers on the channel.
pub type ReloadRequest = oneshot::Sender<Result<(), String>>;

#[derive(Debug, serde::Deserialize)]
#[serde(tag = "command", rename_all = "lowercase", deny_unknown_fields)]
enum Request {
    Status,
    User {
        user: String,
    },
    Reload,
    Unlock {
        user: String,
    },
    #[serde(rename = "revoke-app-password")]
    RevokeAppPassword {
        user: String,
        label: String,
    },
}

/// Binds the control socket at `path` with mode 0600, replacing a stale socket left by a
/// previous run (but never another kind of file).
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(path)?,
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "exists and is not a socket; remove it or set server.control_socket",
            ));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Answers requests on `listener` until `stop` is cancelled.
pub async fn serve(
    listener: UnixListener,
    server: Arc<State>,
    reload: mpsc::Sender<ReloadRequest>,
    stop: CancellationToken,
) {
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "control socket: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = stop.cancelled() => return,
        };
        let server = server.clone();
        let reload = reload.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(IO_TIMEOUT, answer_connection(stream, &server, &reload)).await;
        });
    }
}

/// Who is at the other end of a control connection, for the audit log and alerts:
/// `uid=1000(alice)` from the socket's peer credentials, or `admin` when they cannot be read.
fn peer_account(stream: &UnixStream) -> String {
    let Ok(credentials) = stream.peer_cred() else { return "admin".to_owned() };
    let uid = credentials.uid();
    match account_name(uid) {
        Some(name) => format!("uid={uid}({name})"),
        None => format!("uid={uid}"),
    }
}

/// The name of the account `uid` in `/etc/passwd`, if it is listed there.
fn account_name(uid: u32) -> Option<String> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        let id = fields.nth(1)?;
        (id.parse::<u32>().ok()? == uid).then(|| name.to_owned())
    })
}

async fn answer_connection(stream: UnixStream, server: &State, reload: &mpsc::Sender<ReloadRequest>) -> io::Result<()> {
    let peer = peer_account(&stream);
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(tokio::io::AsyncReadExt::take(read, MAX_CONNECTION_INPUT));
    let mut line = String::new();
    while lines.read_line(&mut line).await? != 0 {
        let answer = match serde_json::from_str::<Request>(line.trim()) {
            Ok(request) => answer(request, server, reload, &peer).await,
            Err(e) => json!({"ok": false, "error": format!("bad request: {e}")}),
        };
        write.write_all(format!("{answer}\n").as_bytes()).await?;
        line.clear();
    }
    Ok(())
}

async fn answer(request: Request, server: &State, reload: &mpsc::Sender<ReloadRequest>, peer: &str) -> Value {
    match request {
        Request::Status => status(server).await,
        Request::User { user } => {
            let Ok(user) = crate::user::normalize(&user) else {
                return json!({"ok": false, "error": "not a usable user name"});
            };
            json!({"ok": true, "user": user, "last_result": server.last_results().get(&user)})
        }
        Request::Reload => {
            let (tx, rx) = oneshot::channel();
            if reload.send(tx).await.is_err() {
                return json!({"ok": false, "error": "the daemon is stopping"});
            }
            match rx.await {
                Ok(Ok(())) => json!({"ok": true}),
                Ok(Err(e)) => json!({"ok": false, "error": e}),
                Err(_) => json!({"ok": false, "error": "the reload was abandoned"}),
            }
        }
        Request::RevokeAppPassword { user, label } => revoke_app_password(server, &user, &label, peer),
        Request::Unlock { user } => {
            let Ok(user) = crate::user::normalize(&user) else {
                return json!({"ok": false, "error": "not a usable user name"});
            };
            match server.counters.unlock(&user).await {
                Ok(was_locked) => {
                    tracing::info!(target: "audit", user = %user, was_locked, by = peer, "lockout lifted by an admin");
                    if was_locked {
                        server.alerts.emit(Event::UserUnlocked { user: user.clone(), by: peer.to_owned() });
                    }
                    json!({"ok": true, "user": user, "was_locked": was_locked})
                }
                Err(e) => json!({"ok": false, "error": e.to_string()}),
            }
        }
    }
}

/// Applies an app password's revocation (the admin command has removed it from the file):
/// the file is read again, so the password is refused from now on, and the sessions it
/// opened are closed at once.
fn revoke_app_password(server: &State, user: &str, label: &str, peer: &str) -> Value {
    let Ok(user) = crate::user::normalize(user) else {
        return json!({"ok": false, "error": "not a usable user name"});
    };
    let Ok(label) = crate::stores::app_passwords::valid_label(label) else {
        return json!({"ok": false, "error": "not a usable label"});
    };
    if let Err(e) = server.reload_app_passwords() {
        return json!({"ok": false, "error": format!("{e}; the app passwords in force stay")});
    }
    if server.app_passwords().contains(&user, &label) {
        return json!({"ok": false, "error": format!("{user} still has an app password labelled {label:?} in the file")});
    }
    let reason = format!("closed: the app password {:?} was revoked by {peer}", crate::user::escape(&label));
    let closed = server.live().revoke_app_password(&user, &label, &reason);
    server.metrics().revoked(closed as u64);
    tracing::info!(target: "audit", event = "app password revoked", user = %user, label = %crate::user::escape(&label), by = peer, sessions_closed = closed, "app password revoked; its live sessions closed");
    json!({"ok": true, "user": user, "label": label, "sessions_closed": closed})
}

async fn status(server: &State) -> Value {
    let metrics = server.metrics();
    let mut sessions = serde_json::Map::new();
    for protocol in [Protocol::Imap, Protocol::Pop3, Protocol::Smtp] {
        sessions.insert(
            protocol.name().into(),
            json!({"active": metrics.active(protocol), "total": metrics.total(protocol)}),
        );
    }
    json!({
        "ok": true,
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_secs": server.uptime().as_secs(),
        "sessions": sessions,
        "logged_in": server.live().len(),
        "last_reload": server.last_reload(),
        "profiles": server.profiles().len(),
        "state_store_up": server.counters.is_up(),
        "locked": match server.counters.locked_users().await {
            Ok(locked) => json!(locked.into_iter()
                .map(|l| json!({"user": l.user, "remaining_secs": l.remaining.map(|r| r.as_secs())}))
                .collect::<Vec<_>>()),
            Err(e) => json!({"error": e.to_string()}),
        },
    })
}
