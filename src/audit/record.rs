//! The audit log: one structured line per session, written when the session ends, and one
//! per refused login attempt.
//!
//! Lines go to the `audit` tracing target, so the process's log format (text or JSON)
//! applies and they can be filtered apart (`RUST_LOG=audit=info`). Nothing a client sent
//! is written here except the user name, and never a password or token.

use std::net::SocketAddr;
use std::time::{Instant, SystemTime};

use crate::protocol::Protocol;
use crate::user::escape;

/// How a session ended, from the admin's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Logged in and spliced to the upstream.
    LoggedIn,
    /// The last login attempt was refused.
    Denied,
    /// The directory or upstream could not serve the login.
    Unavailable,
    /// The client broke the protocol or its limits.
    ProtocolError,
    /// The client did not log in within the pre-login timeout.
    TimedOut,
    /// The client left before logging in.
    Abandoned,
    /// The server shut down before the client logged in.
    Shutdown,
    /// Refused before the greeting: the client's address holds too many connections.
    Busy,
}

impl Outcome {
    /// The outcome as written to the log.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::LoggedIn => "logged-in",
            Outcome::Denied => "denied",
            Outcome::Unavailable => "unavailable",
            Outcome::ProtocolError => "protocol-error",
            Outcome::TimedOut => "timeout",
            Outcome::Abandoned => "abandoned",
            Outcome::Shutdown => "shutdown",
            Outcome::Busy => "busy",
        }
    }
}

/// What an audit line records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The end of a session, whatever happened in it.
    Session,
    /// One refused login attempt; a session with several leaves a trace of each.
    LoginRefused,
    /// A connection on a PROXY protocol listener closed before TLS: an untrusted peer, or a
    /// missing, malformed, truncated or late header. `client` is the peer that connected.
    ProxyHeaderRefused,
}

impl Event {
    /// The event as written to the log.
    pub fn as_str(self) -> &'static str {
        match self {
            Event::Session => "session",
            Event::LoginRefused => "login refused",
            Event::ProxyHeaderRefused => "proxy header refused",
        }
    }
}

/// Everything the audit line of one session says, filled in as the session goes. Text
/// fields are written [escaped](crate::user::escape): an upstream's answer or a name cannot
/// forge or disguise a line.
#[derive(Debug)]
pub struct SessionRecord {
    /// The protocol.
    pub protocol: Protocol,
    /// The client's address and port (from the PROXY protocol header behind a balancer).
    pub client: SocketAddr,
    /// The load balancer the client came through, on PROXY protocol listeners.
    pub via: Option<SocketAddr>,
    started: Instant,
    /// Wall-clock time the session was accepted, for the audit file.
    pub started_at: SystemTime,
    /// The user name of the last login attempt (directory identity).
    pub user: Option<String>,
    /// A login mode taken from the user name, e.g. `recent` for POP3 `recent:` logins.
    pub mode: Option<&'static str>,
    /// How the client authenticated.
    pub mechanism: Option<&'static str>,
    /// The profile and allow entry that admitted the client.
    pub profile: Option<String>,
    /// The route the login took (`default` for the protocol tables), once admitted.
    pub route: Option<String>,
    /// The client certificate presented in the TLS handshake: SHA-256 fingerprint and serial.
    pub certificate: Option<String>,
    /// The label of the app password the client logged in with (never the password).
    pub app_password: Option<String>,
    /// The upstream `host:port`: the default route's until a login takes its route.
    pub upstream: String,
    /// Login attempts on this connection.
    pub attempts: u32,
    /// The outcome.
    pub outcome: Outcome,
    /// The precise reason for the outcome.
    pub reason: String,
    /// Bytes relayed client to upstream.
    pub bytes_up: u64,
    /// Bytes relayed upstream to client.
    pub bytes_down: u64,
}

impl SessionRecord {
    /// Starts the record of a session that has just been accepted.
    pub fn new(protocol: Protocol, client: SocketAddr, upstream: &str) -> Self {
        Self {
            protocol,
            client,
            via: None,
            started: Instant::now(),
            started_at: SystemTime::now(),
            user: None,
            mode: None,
            mechanism: None,
            profile: None,
            route: None,
            certificate: None,
            app_password: None,
            upstream: upstream.to_owned(),
            attempts: 0,
            outcome: Outcome::Abandoned,
            reason: "client closed the connection before logging in".to_owned(),
            bytes_up: 0,
            bytes_down: 0,
        }
    }

    /// Sets the outcome and its reason.
    pub fn set(&mut self, outcome: Outcome, reason: impl Into<String>) {
        self.outcome = outcome;
        self.reason = reason.into();
    }

    /// The record as a JSON object, for the audit file.
    pub fn to_json(&self, event: Event) -> serde_json::Value {
        serde_json::json!({
            "event": event.as_str(),
            "protocol": self.protocol.name(),
            "client": self.client.to_string(),
            "via": self.via.map_or_else(|| "-".to_owned(), |v| v.to_string()),
            "user": escape(self.user.as_deref().unwrap_or("-")),
            "mode": self.mode.unwrap_or("-"),
            "mechanism": self.mechanism.unwrap_or("-"),
            "outcome": self.outcome.as_str(),
            "reason": escape(&self.reason),
            "profile": escape(self.profile.as_deref().unwrap_or("-")),
            "route": self.route.as_deref().unwrap_or("-"),
            "certificate": self.certificate.as_deref().unwrap_or("-"),
            "app_password": escape(self.app_password.as_deref().unwrap_or("-")),
            "upstream": escape(&self.upstream),
            "attempts": self.attempts,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "duration_ms": self.started.elapsed().as_millis() as u64,
        })
    }

    /// Writes the audit line for `event` to the `audit` log target.
    pub fn emit(&self, event: Event) {
        tracing::info!(
            target: "audit",
            protocol = self.protocol.name(),
            client = %self.client,
            via = %self.via.map_or_else(|| "-".to_owned(), |v| v.to_string()),
            user = %escape(self.user.as_deref().unwrap_or("-")),
            mode = self.mode.unwrap_or("-"),
            mechanism = self.mechanism.unwrap_or("-"),
            outcome = self.outcome.as_str(),
            reason = %escape(&self.reason),
            profile = %escape(self.profile.as_deref().unwrap_or("-")),
            route = self.route.as_deref().unwrap_or("-"),
            certificate = self.certificate.as_deref().unwrap_or("-"),
            app_password = %escape(self.app_password.as_deref().unwrap_or("-")),
            upstream = %escape(&self.upstream),
            attempts = self.attempts,
            bytes_up = self.bytes_up,
            bytes_down = self.bytes_down,
            duration_ms = self.started.elapsed().as_millis() as u64,
            "{}",
            event.as_str()
        );
    }
}
