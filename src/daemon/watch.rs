//! Applying edits of the profiles file, the client CA and CRL files and the app password
//! file without a reload: each file's size, modification time and inode are polled every
//! second (no inotify, so it works on any file system and with editors that replace the
//! file), and a changed file is loaded and applied. A file that does not load is logged
//! and what is in force stays.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

use crate::access::decision::{close_revoked_app_password_sessions, revalidate};
use crate::access::profiles::Profiles;
use crate::state::State;

/// How often the file is checked; a change applies within this plus the load time.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// What identifies one version of a file without reading it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Fingerprint {
    len: u64,
    modified: Option<SystemTime>,
    inode: u64,
}

fn fingerprint(path: &Path) -> Option<Fingerprint> {
    let meta = std::fs::metadata(path).ok()?;
    Some(Fingerprint { len: meta.len(), modified: meta.modified().ok(), inode: meta.ino() })
}

/// Watches `[tls] client_ca` and `client_crl` of `config` until `stop` is cancelled; a
/// change (e.g. `postern cert revoke` rewriting the CRL) applies to new logins and closes
/// live sessions whose certificate no longer does.
pub async fn watch_client_ca(server: Arc<State>, config: crate::config::Config, stop: CancellationToken) {
    let paths: Vec<PathBuf> =
        [&config.tls.client_ca, &config.tls.client_crl].into_iter().flatten().map(|p| config.resolve(p)).collect();
    let mut seen: Vec<Option<Fingerprint>> = paths.iter().map(|p| fingerprint(p)).collect();
    loop {
        tokio::select! {
            () = tokio::time::sleep(POLL_INTERVAL) => {}
            () = stop.cancelled() => return,
        }
        let now: Vec<Option<Fingerprint>> = paths.iter().map(|p| fingerprint(p)).collect();
        if now == seen {
            continue;
        }
        seen = now;
        match server.reload_client_ca(&config).await {
            Ok(()) => {
                tracing::info!("applied the changed client CA or CRL");
                revalidate(&server).await;
            }
            Err(e) => tracing::error!(error = %e, "the changed client CA or CRL does not load; the ones in force stay"),
        }
    }
}

/// Watches the profiles file at `path` until `stop` is cancelled.
pub async fn watch_profiles(server: Arc<State>, path: PathBuf, stop: CancellationToken) {
    let mut seen = fingerprint(&path);
    loop {
        tokio::select! {
            () = tokio::time::sleep(POLL_INTERVAL) => {}
            () = stop.cancelled() => return,
        }
        let now = fingerprint(&path);
        if now == seen {
            continue;
        }
        seen = now;
        if seen.is_none() {
            tracing::error!(path = %path.display(), "the profiles file is gone; the profiles in force stay");
            continue;
        }
        match Profiles::load(&path) {
            Ok(profiles) => {
                tracing::info!(profiles = profiles.len(), "applied the changed security profiles");
                server.set_profiles(profiles);
                revalidate(&server).await;
            }
            Err(e) => tracing::error!(error = %e, "the changed profiles file is invalid; the profiles in force stay"),
        }
    }
}

/// Watches the app password file at `path` (written by `postern user app-password` and the
/// daemon's own last-use writes) until `stop` is cancelled. A change applies to logins at
/// once; the live sessions of app passwords no longer in it are closed one poll later, so a
/// revocation that the control socket reports (with who asked) closes them first.
pub async fn watch_app_passwords(server: Arc<State>, path: PathBuf, stop: CancellationToken) {
    let mut seen = fingerprint(&path);
    let mut close_revoked = false;
    loop {
        tokio::select! {
            () = tokio::time::sleep(POLL_INTERVAL) => {}
            () = stop.cancelled() => return,
        }
        if std::mem::take(&mut close_revoked) {
            close_revoked_app_password_sessions(&server);
        }
        let now = fingerprint(&path);
        if now == seen {
            continue;
        }
        seen = now;
        match server.reload_app_passwords() {
            Ok(()) => {
                tracing::debug!("applied the changed app password file");
                close_revoked = true;
            }
            Err(e) => {
                tracing::error!(error = %e, "the changed app password file is unusable; the app passwords in force stay")
            }
        }
    }
}
