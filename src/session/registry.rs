//! Live logged-in sessions, so a reload can close the ones whose user no longer passes the
//! access decision and a revoked app password can close the sessions it opened, and each
//! user's last upstream login result for `postern status`.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use dashmap::DashMap;
use tokio_util::sync::CancellationToken;

use super::relay::Counters;
use crate::access::certificate::PresentedCertificate;
use crate::access::profiles::PasswordKind;
use crate::protocol::Protocol;
use crate::upstream::route::RouteTaken;

/// One logged-in session as the registry sees it.
#[derive(Debug)]
pub struct LiveSession {
    /// The registry's number for it, unique while the process runs.
    pub id: u64,
    /// When it logged in.
    pub since: SystemTime,
    bytes: OnceLock<Arc<Counters>>,
    /// The user (directory identity, lower case).
    pub user: String,
    /// The protocol.
    pub protocol: Protocol,
    /// The client's address.
    pub ip: IpAddr,
    /// The route and upstream the session took.
    pub route: RouteTaken,
    /// The certificate the client presented in its TLS handshake, judged again on reload.
    pub certificate: Option<PresentedCertificate>,
    /// The label of the app password the session logged in with; `None` for the directory
    /// password.
    pub app_password: Option<String>,
    revoke: CancellationToken,
    reason: OnceLock<String>,
}

impl LiveSession {
    /// Bytes relayed so far: client to upstream, upstream to client.
    pub fn bytes(&self) -> (u64, u64) {
        self.bytes.get().map_or((0, 0), |c| (c.up.load(Ordering::Relaxed), c.down.load(Ordering::Relaxed)))
    }

    /// Closes the session; the first reason given is the one its audit line shows.
    pub fn revoke(&self, reason: impl Into<String>) {
        let _ = self.reason.set(reason.into());
        self.revoke.cancel();
    }

    /// The kind of password the session logged in with.
    pub fn password_kind(&self) -> PasswordKind {
        if self.app_password.is_some() { PasswordKind::App } else { PasswordKind::Directory }
    }
}

/// The sessions logged in now.
#[derive(Debug, Default)]
pub struct LiveSessions {
    next: AtomicU64,
    sessions: DashMap<u64, Arc<LiveSession>>,
}

/// A session's registration; unregisters when dropped.
#[derive(Debug)]
pub struct Registration<'a> {
    id: u64,
    session: Arc<LiveSession>,
    registry: &'a LiveSessions,
}

impl Registration<'_> {
    /// Lets the registry show the session's byte counts.
    pub fn track(&self, counters: Arc<Counters>) {
        let _ = self.session.bytes.set(counters);
    }

    /// Completes when the session has been revoked.
    pub fn revoked(&self) -> tokio_util::sync::WaitForCancellationFutureOwned {
        self.session.revoke.clone().cancelled_owned()
    }

    /// Why the session was revoked, if it was.
    pub fn revoked_reason(&self) -> Option<&str> {
        self.session.reason.get().map(String::as_str)
    }
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        self.registry.sessions.remove(&self.id);
    }
}

impl LiveSessions {
    /// Registers a session that has just logged in (with the app password labelled
    /// `app_password`, if one).
    pub fn register(
        &self,
        user: String,
        protocol: Protocol,
        ip: IpAddr,
        route: RouteTaken,
        certificate: Option<PresentedCertificate>,
        app_password: Option<String>,
    ) -> Registration<'_> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let session = Arc::new(LiveSession {
            id,
            since: SystemTime::now(),
            bytes: OnceLock::new(),
            user,
            protocol,
            ip,
            route,
            certificate,
            app_password,
            revoke: CancellationToken::new(),
            reason: OnceLock::new(),
        });
        self.sessions.insert(id, session.clone());
        Registration { id, session, registry: self }
    }

    /// Closes the live sessions of `user` that logged in with the app password labelled
    /// `label` (ignoring case), giving `reason`; how many.
    pub fn revoke_app_password(&self, user: &str, label: &str, reason: &str) -> usize {
        let label = label.to_lowercase();
        let mut closed = 0;
        for session in self.snapshot() {
            if session.user == user && session.app_password.as_ref().is_some_and(|l| l.to_lowercase() == label) {
                session.revoke(reason);
                closed += 1;
            }
        }
        closed
    }

    /// A snapshot of the sessions logged in now.
    pub fn snapshot(&self) -> Vec<Arc<LiveSession>> {
        self.sessions.iter().map(|e| e.value().clone()).collect()
    }

    /// The session numbered `id`, if it is still logged in.
    pub fn get(&self, id: u64) -> Option<Arc<LiveSession>> {
        self.sessions.get(&id).map(|e| e.value().clone())
    }

    /// Number of sessions logged in now.
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    /// Whether no session is logged in.
    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }
}

/// The result of a user's last upstream login.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct LastResult {
    /// When, in seconds since the Unix epoch.
    pub at: u64,
    /// The protocol.
    pub protocol: Protocol,
    /// Whether the upstream accepted the stored credential.
    pub ok: bool,
    /// `OK`, or what went wrong (the upstream's answer when it refused).
    pub message: String,
}

/// Each user's last upstream login result, in memory only.
#[derive(Debug, Default)]
pub struct LastResults(DashMap<String, LastResult>);

impl LastResults {
    /// Records the result of an upstream login for `user`.
    pub fn record(&self, user: &str, protocol: Protocol, ok: bool, message: impl Into<String>) {
        let at = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        self.0.insert(user.to_owned(), LastResult { at, protocol, ok, message: message.into() });
    }

    /// The last result of `user`, if any login reached the upstream since start.
    pub fn get(&self, user: &str) -> Option<LastResult> {
        self.0.get(user).map(|r| r.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn registrations_leave_on_drop_and_revocation_keeps_the_first_reason() {
        let live = LiveSessions::default();
        let a = live.register(
            "a@x".into(),
            Protocol::Imap,
            IpAddr::from([127, 0, 0, 1]),
            RouteTaken::new("default", "u:1"),
            None,
            None,
        );
        let b = live.register(
            "b@x".into(),
            Protocol::Pop3,
            IpAddr::from([127, 0, 0, 1]),
            RouteTaken::new("default", "u:1"),
            None,
            None,
        );
        assert_eq!(live.len(), 2);
        for s in live.snapshot().iter().filter(|s| s.user == "a@x") {
            s.revoke("first");
            s.revoke("second");
        }
        a.revoked().await;
        assert_eq!(a.revoked_reason(), Some("first"));
        assert_eq!(b.revoked_reason(), None);
        drop(a);
        assert_eq!(live.len(), 1);
        drop(b);
        assert!(live.is_empty());
    }

    #[tokio::test]
    async fn revoking_an_app_password_closes_only_its_sessions() {
        let live = LiveSessions::default();
        let ip = IpAddr::from([127, 0, 0, 1]);
        let phone = live.register(
            "a@x".into(),
            Protocol::Imap,
            ip,
            RouteTaken::new("default", "u:1"),
            None,
            Some("Phone".into()),
        );
        let laptop = live.register(
            "a@x".into(),
            Protocol::Imap,
            ip,
            RouteTaken::new("default", "u:1"),
            None,
            Some("laptop".into()),
        );
        let directory = live.register("a@x".into(), Protocol::Pop3, ip, RouteTaken::new("default", "u:1"), None, None);
        let other = live.register(
            "b@x".into(),
            Protocol::Imap,
            ip,
            RouteTaken::new("default", "u:1"),
            None,
            Some("phone".into()),
        );
        assert_eq!(live.revoke_app_password("a@x", "phone", "revoked"), 1);
        phone.revoked().await;
        assert_eq!(phone.revoked_reason(), Some("revoked"));
        for kept in [&laptop, &directory, &other] {
            assert_eq!(kept.revoked_reason(), None);
        }
        assert_eq!(live.snapshot().iter().filter(|s| s.password_kind() == PasswordKind::App).count(), 3);
    }
}
