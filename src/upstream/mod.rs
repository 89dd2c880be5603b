//! The upstream side: TLS to the real mail server and a login there with the user's stored
//! credential, for each protocol.
//!
//! A login returns the TLS stream ready for splicing, what the client's success reply needs,
//! and any bytes the server sent after its login answer (they belong to the client).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::{UpstreamAuthMode, UpstreamConfig, UpstreamTls};
use crate::protocol::{Protocol, UpstreamInfo};
use crate::secret::Secret;
use crate::tls::{self, TlsError};

mod address;
pub mod credential;
mod imap;
pub mod mechanism;
mod pop3;
pub mod route;
mod smtp;

/// The TLS stream to an upstream server.
pub type UpstreamStream = crate::tls::stream::ClientTls<TcpStream>;

/// Longest line accepted from an upstream during login.
const MAX_UPSTREAM_LINE: usize = 64 * 1024;

/// How Postern proves itself to the upstream for one user.
#[derive(Debug, Clone)]
pub enum UpstreamAuth {
    /// A stored password or app password (IMAP `LOGIN`, SASL PLAIN or LOGIN, POP3
    /// `USER`/`PASS`, as the upstream offers: see [`mechanism`]).
    Password {
        /// Upstream login name.
        user: String,
        /// The password.
        password: Secret,
    },
    /// An OAuth2 access token (SASL `XOAUTH2`).
    XOAuth2 {
        /// The mailbox address.
        user: String,
        /// The bearer token.
        token: Secret,
    },
}

impl UpstreamAuth {
    /// The upstream login name.
    pub fn user(&self) -> &str {
        match self {
            UpstreamAuth::Password { user, .. } | UpstreamAuth::XOAuth2 { user, .. } => user,
        }
    }

    /// What kind of secret this is, for choosing the login method.
    pub fn kind(&self) -> mechanism::CredentialKind {
        match self {
            UpstreamAuth::Password { .. } => mechanism::CredentialKind::Password,
            UpstreamAuth::XOAuth2 { .. } => mechanism::CredentialKind::Token,
        }
    }
}

/// Why the upstream login did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// TCP connect failed.
    #[error("cannot connect to {address}: {message}")]
    Connect {
        /// The upstream address.
        address: String,
        /// The error.
        message: String,
    },
    /// The TLS handshake failed (untrusted or mismatched certificate, protocol error).
    #[error("TLS with {address} failed: {message}")]
    Tls {
        /// The upstream address.
        address: String,
        /// The error.
        message: String,
    },
    /// The upstream did not finish in time.
    #[error("upstream did not answer within {0:?}")]
    Timeout(Duration),
    /// The upstream closed the connection or a read/write failed.
    #[error("upstream connection failed: {0}")]
    Io(String),
    /// The upstream answered something the login dialogue does not allow.
    #[error("unexpected upstream answer: {0}")]
    Protocol(String),
    /// Nothing the upstream offers fits the stored credential.
    #[error(transparent)]
    NoMethod(#[from] mechanism::NoMethod),
    /// The upstream refused the stored credential; its answer is kept for the admin.
    #[error("upstream refused the stored credential: {0}")]
    Refused(String),
}

/// A logged-in upstream session.
pub struct LoggedIn {
    /// The stream, positioned after the login answer.
    pub stream: UpstreamStream,
    /// What the client's success reply needs.
    pub info: UpstreamInfo,
    /// Bytes the server sent after the login answer, to be forwarded to the client first.
    pub leftover: BytesMut,
}

/// One configured upstream server.
pub struct Upstream {
    protocol: Protocol,
    address: String,
    /// `address` resolved, kept between logins.
    resolved: address::UpstreamAddress,
    server_name: ServerName<'static>,
    tls_config: Arc<rustls::ClientConfig>,
    tls: UpstreamTls,
    auth_mode: UpstreamAuthMode,
    forward_client_address: bool,
    timeout: Duration,
    hostname: String,
}

impl Upstream {
    /// Prepares connections to the upstream `config` names; nothing is dialled yet.
    pub fn new(
        protocol: Protocol,
        config: &UpstreamConfig,
        ca_file: Option<&std::path::Path>,
        hostname: &str,
        timeout: Duration,
    ) -> Result<Self, TlsError> {
        if config.upstream_tls_insecure_no_verify {
            tracing::warn!(%protocol, upstream = %config.address, "upstream certificates are NOT verified (upstream_tls_insecure_no_verify); anyone on the path can read every password");
        }
        let name = config.upstream_server_name.clone().unwrap_or_else(|| config.upstream_host().to_owned());
        let server_name = ServerName::try_from(name.clone()).map_err(|e| TlsError::File {
            what: "upstream server name",
            path: name.into(),
            message: e.to_string(),
        })?;
        Ok(Self {
            protocol,
            address: config.address.clone(),
            resolved: address::UpstreamAddress::new(&config.address),
            server_name,
            tls_config: tls::upstream_client_config(ca_file, &config.upstream_trust())?,
            tls: config.upstream_tls,
            auth_mode: config.upstream_auth,
            forward_client_address: config.forward_client_address,
            timeout,
            hostname: hostname.to_owned(),
        })
    }

    /// The upstream's `host:port`, for logs.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// How logins to this upstream authenticate (`upstream_auth` in the config).
    pub fn auth_mode(&self) -> UpstreamAuthMode {
        self.auth_mode
    }

    /// Connects, secures and logs in with `auth`. `client_hello` is the client's SMTP `EHLO`
    /// name, reused upstream; `client` the client's address, passed on (IMAP `ID`, POP3 and
    /// SMTP `XCLIENT`, where the upstream offers them) when `forward_client_address` is on.
    /// The whole exchange is bounded by the upstream timeout.
    pub async fn login(
        &self,
        auth: &UpstreamAuth,
        client_hello: Option<&str>,
        client: Option<SocketAddr>,
    ) -> Result<LoggedIn, UpstreamError> {
        let client = client.filter(|_| self.forward_client_address).map(canonical);
        tokio::time::timeout(self.timeout, self.login_inner(auth, client_hello, client))
            .await
            .unwrap_or(Err(UpstreamError::Timeout(self.timeout)))
    }

    async fn login_inner(
        &self,
        auth: &UpstreamAuth,
        client_hello: Option<&str>,
        client: Option<SocketAddr>,
    ) -> Result<LoggedIn, UpstreamError> {
        let tcp = self
            .resolved
            .connect()
            .await
            .map_err(|e| UpstreamError::Connect { address: self.address.clone(), message: e.to_string() })?;
        let _ = tcp.set_nodelay(true);
        let hello = client_hello.unwrap_or(&self.hostname);
        let logged_in = match (self.protocol, self.tls) {
            (Protocol::Smtp, UpstreamTls::Starttls) => {
                let tcp = smtp::starttls(Conn::new(tcp), hello).await?;
                let conn = Conn::new(self.handshake(tcp).await?);
                smtp::login(conn, auth, hello, false, client).await
            }
            (protocol, _) => {
                let conn = Conn::new(self.handshake(tcp).await?);
                match protocol {
                    Protocol::Imap => imap::login(conn, auth, client).await,
                    Protocol::Pop3 => pop3::login(conn, auth, client).await,
                    Protocol::Smtp => smtp::login(conn, auth, hello, true, client).await,
                }
            }
        };
        let (conn, info) = logged_in?;
        let (stream, leftover) = conn.into_parts();
        Ok(LoggedIn { stream, info, leftover })
    }

    async fn handshake(&self, tcp: TcpStream) -> Result<UpstreamStream, UpstreamError> {
        tls::stream::connect(self.tls_config.clone(), self.server_name.clone(), tcp)
            .await
            .map_err(|e| UpstreamError::Tls { address: self.address.clone(), message: e.to_string() })
    }
}

/// A line-oriented view of an upstream connection during login.
struct Conn<S> {
    stream: S,
    buf: BytesMut,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    fn new(stream: S) -> Self {
        Self { stream, buf: BytesMut::with_capacity(4096) }
    }

    /// The next line without its terminator, lossily decoded for matching and messages.
    async fn read_line(&mut self) -> Result<String, UpstreamError> {
        loop {
            if let Some(end) = self.buf.iter().position(|&b| b == b'\n') {
                let line = self.buf.split_to(end + 1);
                let text = String::from_utf8_lossy(&line);
                return Ok(text.trim_end_matches(['\r', '\n']).to_owned());
            }
            if self.buf.len() > MAX_UPSTREAM_LINE {
                return Err(UpstreamError::Protocol("line too long".to_owned()));
            }
            let n = self.stream.read_buf(&mut self.buf).await.map_err(|e| UpstreamError::Io(e.to_string()))?;
            if n == 0 {
                return Err(UpstreamError::Io("connection closed by the upstream".to_owned()));
            }
        }
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<(), UpstreamError> {
        self.stream.write_all(bytes).await.map_err(|e| UpstreamError::Io(e.to_string()))?;
        self.stream.flush().await.map_err(|e| UpstreamError::Io(e.to_string()))
    }

    /// Sends `text` and CRLF from one buffer that is wiped afterwards: for lines that carry
    /// a credential (SASL responses).
    async fn send_secret_line(&mut self, text: &str) -> Result<(), UpstreamError> {
        let mut line = zeroize::Zeroizing::new(Vec::with_capacity(text.len() + 2));
        line.extend_from_slice(text.as_bytes());
        line.extend_from_slice(b"\r\n");
        self.send(&line).await
    }

    fn into_parts(self) -> (S, BytesMut) {
        (self.stream, self.buf)
    }
}

/// The address with an IPv4-mapped IPv6 address written as IPv4, as upstreams expect it.
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// Base64 of `text`, wiped on drop: one SASL response.
fn b64(text: &str) -> zeroize::Zeroizing<String> {
    use base64::Engine;
    zeroize::Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(text.as_bytes()))
}

/// Refuses a value that would break out of the protocol line it is written into.
fn check_line_safe(what: &str, value: &str) -> Result<(), UpstreamError> {
    if value.bytes().any(|b| matches!(b, b'\r' | b'\n' | 0)) {
        return Err(UpstreamError::Protocol(format!("{what} contains CR, LF or NUL; refusing to send it")));
    }
    Ok(())
}

/// Describes a SASL XOAUTH2 error challenge for logs and errors. The provider sends base64
/// of a JSON object such as `{"status":"401","schemes":"bearer","scope":"..."}`; the result
/// reads `XOAUTH2 status=401 schemes=bearer scope=...`. Nothing in it is secret.
fn xoauth2_error(challenge: &str) -> String {
    use base64::Engine;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(challenge.trim())
        .ok()
        .and_then(|bytes| serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(&bytes).ok());
    let Some(fields) = decoded else {
        return "XOAUTH2 error challenge that is not base64 JSON".to_owned();
    };
    let mut out = String::from("XOAUTH2");
    for key in ["status", "schemes", "scope"] {
        let value = match fields.get(key) {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Number(n)) => n.to_string(),
            _ => continue,
        };
        let value: String = value.chars().filter(|c| !c.is_control()).take(120).collect();
        out.push_str(&format!(" {key}={value}"));
    }
    out
}

/// A refusal carrying the upstream's answer and, if one came, its XOAUTH2 error challenge.
fn refused(answer: &str, challenge: Option<&str>) -> UpstreamError {
    match challenge {
        Some(c) => UpstreamError::Refused(format!("{} ({})", excerpt(answer), xoauth2_error(c))),
        None => UpstreamError::Refused(excerpt(answer)),
    }
}

/// Shortens an upstream answer for logs and errors.
fn excerpt(line: &str) -> String {
    const MAX: usize = 300;
    if line.len() <= MAX {
        return line.to_owned();
    }
    let mut end = MAX;
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &line[..end])
}

/// A scripted upstream for the login dialogues' unit tests.
#[cfg(test)]
mod script {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, DuplexStream};

    use super::Conn;

    /// Plays a server: sends `greeting`, then for each step reads one line (which must start
    /// with the step's prefix) and sends the step's reply. Returns the client's side and the
    /// lines the server received.
    pub(super) fn serve(
        greeting: &'static str,
        steps: Vec<(&'static str, &'static str)>,
    ) -> (Conn<DuplexStream>, tokio::task::JoinHandle<Vec<String>>) {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let task = tokio::spawn(async move {
            let (read, mut write) = tokio::io::split(server);
            let mut read = BufReader::new(read);
            write.write_all(greeting.as_bytes()).await.unwrap();
            let mut seen = Vec::new();
            for (prefix, reply) in steps {
                let mut line = String::new();
                if read.read_line(&mut line).await.unwrap_or(0) == 0 {
                    break;
                }
                assert!(line.starts_with(prefix), "expected {prefix:?}, got {line:?}");
                seen.push(line);
                write.write_all(reply.as_bytes()).await.unwrap();
            }
            seen
        });
        (Conn::new(client), task)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    #[test]
    fn xoauth2_error_challenges_are_summarised() {
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        assert_eq!(
            xoauth2_error(&b64(r#"{"status":"401","schemes":"bearer","scope":"https://mail.google.com/"}"#)),
            "XOAUTH2 status=401 schemes=bearer scope=https://mail.google.com/"
        );
        assert_eq!(xoauth2_error(&b64(r#"{"status":400}"#)), "XOAUTH2 status=400");
        assert!(xoauth2_error("%%%").contains("not base64 JSON"));
        let err = refused("NO [AUTHENTICATIONFAILED] nope", Some(&b64(r#"{"status":"401"}"#)));
        assert_eq!(
            err.to_string(),
            "upstream refused the stored credential: NO [AUTHENTICATIONFAILED] nope (XOAUTH2 status=401)"
        );
    }
}
