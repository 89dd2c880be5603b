//! Pre-login dialogues of the three protocols, as pure state machines over bytes.
//!
//! A [`Dialogue`] never does I/O. The session feeds it the bytes the client sent and acts
//! on the [`Step`] it returns: write a reply, read more, close, or run the access decision
//! for the credentials the client presented. Bytes the client pipelined after its login
//! command stay in the input buffer, so the session can forward them upstream.

use bytes::BytesMut;

use crate::secret::Secret;

pub mod fields;
pub mod imap;
pub mod limits;
pub mod line;
pub mod pop3;
pub mod proxy;
pub mod sasl;
pub mod smtp;

/// The mail protocols Postern proxies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// IMAP4rev1 over implicit TLS (IMAPS).
    Imap,
    /// POP3 over implicit TLS (POP3S).
    Pop3,
    /// SMTP submission over implicit TLS (SMTPS).
    Smtp,
}

impl Protocol {
    /// Every protocol, in the order config files and reports list them.
    pub const ALL: [Protocol; 3] = [Protocol::Imap, Protocol::Pop3, Protocol::Smtp];

    /// Lower-case name used in config, logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Imap => "imap",
            Protocol::Pop3 => "pop3",
            Protocol::Smtp => "smtp",
        }
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Credentials a client presented, already decoded from the protocol's syntax.
#[derive(Debug, Clone)]
pub struct Credentials {
    /// The identity for the directory, profiles, lockout and vault: the mail address the
    /// client typed, minus any mode prefix such as POP3's `recent:`.
    pub user: String,
    /// Prefix to put back in front of the upstream user name (`"recent:"`), or empty.
    pub upstream_prefix: String,
    /// The directory password.
    pub password: Secret,
    /// How the client logged in (`LOGIN`, `AUTHENTICATE PLAIN`, `USER/PASS`...), for the audit log.
    pub mechanism: &'static str,
    /// SMTP only: the name the client gave in `EHLO`/`HELO`, reused for the upstream `EHLO`.
    pub client_hello: Option<String>,
}

/// What the upstream login learned that the client's success reply needs.
#[derive(Debug, Clone, Default)]
pub struct UpstreamInfo {
    /// IMAP: the upstream's capability list after login (without the `CAPABILITY` word).
    pub capabilities: Option<String>,
}

/// What the session must do after feeding bytes to a [`Dialogue`].
#[derive(Debug)]
pub enum Step {
    /// The buffered input holds no complete command yet: read more from the client.
    NeedMore,
    /// Write these bytes to the client, then call [`Dialogue::step`] again.
    Reply(Vec<u8>),
    /// Write these bytes to the client and close the connection (e.g. `LOGOUT`, `QUIT`,
    /// an over-long line, too many bad commands).
    Close(Vec<u8>),
    /// The client presented credentials: run the access decision, then answer with
    /// [`Dialogue::accepted`], [`Dialogue::denied`] or [`Dialogue::unavailable`].
    Login(Credentials),
    /// The client presented credentials the dialogue can tell are unusable without asking
    /// anyone: count, delay and audit the refusal as any other, then answer with
    /// [`Dialogue::denied`].
    Refused(Rejected),
    /// The client announced a literal of this many bytes (within the literal limit): find
    /// room for it, tell [`Dialogue::literal_room`] whether there is, then step again.
    /// Nothing is allocated for it, nor any continuation sent, before that.
    Literal(usize),
    /// The client asked for TLS on a STARTTLS listener (IMAP `STARTTLS`, POP3 `STLS`,
    /// SMTP `STARTTLS`): write these bytes (the go-ahead), drop every byte still buffered
    /// (plaintext sent after the command must never be executed), run the TLS handshake,
    /// then go on with a new [`dialogue`] over TLS. The dialogue reads nothing more.
    StartTls(Vec<u8>),
}

/// Credentials refused by the dialogue itself, before the directory is asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// The user name as the client gave it (trimmed), when it is a usable field at all.
    pub user: Option<String>,
    /// How the client logged in, as in [`Credentials::mechanism`].
    pub mechanism: &'static str,
    /// What is wrong with the credentials.
    pub fault: CredentialFault,
}

/// What makes credentials unusable before the directory is asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CredentialFault {
    /// SASL PLAIN asked to act as someone other than the authenticating user.
    AuthzidMismatch,
    /// The password is empty.
    EmptyPassword,
    /// The user name is blank or holds control characters.
    InvalidUserName,
    /// A login was attempted before STARTTLS on a STARTTLS listener. Nothing the client
    /// sent with it is kept: no user name, no password.
    TlsRequired,
}

/// Limits and names a dialogue is built with.
#[derive(Debug, Clone)]
pub struct DialogueSettings {
    /// Longest command line accepted, terminator included; longer closes the connection.
    pub max_line: usize,
    /// Largest literal (IMAP `{n}`) accepted.
    pub max_literal: usize,
    /// Host name announced in greetings (SMTP `220 <name> ...`, `250-<name>`).
    pub hostname: String,
    /// SMTP: the `SIZE` to advertise in `EHLO`, if any.
    pub smtp_max_size: Option<u64>,
}

impl Default for DialogueSettings {
    fn default() -> Self {
        Self {
            max_line: crate::protocol::limits::DEFAULT_MAX_LINE,
            max_literal: crate::protocol::limits::DEFAULT_MAX_LITERAL,
            hostname: "postern".to_owned(),
            smtp_max_size: None,
        }
    }
}

/// The pre-login half of a protocol, driven by the shared session pipeline.
///
/// Every method is pure: it returns bytes to write and never blocks. Replies that refer to
/// the pending login (IMAP's tag) are produced by the dialogue, which remembers it.
pub trait Dialogue: Send {
    /// The greeting sent when the connection opens.
    fn greeting(&mut self) -> Vec<u8>;
    /// Consumes what it can from the front of `input` and says what to do next. Bytes
    /// after a complete login command are left in `input`.
    fn step(&mut self, input: &mut BytesMut) -> Step;
    /// Reply to the pending login when the access decision refused it. The text is the same
    /// whatever the reason: "You are not allowed to access this server".
    fn denied(&mut self) -> Vec<u8>;
    /// Reply to the pending login when the directory or upstream could not be reached.
    fn unavailable(&mut self) -> Vec<u8>;
    /// Reply to the pending login once the upstream session is logged in.
    fn accepted(&mut self, upstream: &UpstreamInfo) -> Vec<u8>;
    /// Goodbye sent when the client took too long to log in.
    fn timed_out(&self) -> Vec<u8>;
    /// Goodbye sent when the server is shutting down before the client logged in.
    fn shutting_down(&self) -> Vec<u8>;
    /// Goodbye sent instead of the greeting when the client's address holds too many
    /// connections already.
    fn too_many_connections(&self) -> Vec<u8>;
    /// Goodbye sent when the server has no room left to buffer more of the client's input
    /// before login.
    fn busy(&self) -> Vec<u8>;
    /// Answers the latest [`Step::Literal`]: `granted` when there is room for the literal.
    /// A refused literal is refused with the protocol's error. Ignored when no literal is
    /// waiting; only IMAP has literals.
    fn literal_room(&mut self, granted: bool) {
        let _ = granted;
    }
    /// Bytes of client input the dialogue holds or has room for now (literals of the
    /// command being read); the input buffer is the session's.
    fn held(&self) -> usize {
        0
    }
}

/// Builds the dialogue for `protocol`.
pub fn dialogue(protocol: Protocol, settings: &DialogueSettings) -> Box<dyn Dialogue> {
    match protocol {
        Protocol::Imap => Box::new(imap::ImapDialogue::new(settings)),
        Protocol::Pop3 => Box::new(pop3::Pop3Dialogue::new(settings)),
        Protocol::Smtp => Box::new(smtp::SmtpDialogue::new(settings)),
    }
}

/// Builds the dialogue for `protocol` on a STARTTLS listener, before TLS: it only offers
/// the upgrade (IMAP `CAPABILITY`, `NOOP`, `LOGOUT`, `STARTTLS`; POP3 `CAPA`, `STLS`,
/// `QUIT`; SMTP `EHLO`/`HELO`, `STARTTLS`, `NOOP`, `RSET`, `QUIT`), answers every login
/// attempt with [`Step::Refused`] ([`CredentialFault::TlsRequired`]) and the protocol's
/// "use TLS first" reply as [`Dialogue::denied`], and ends with [`Step::StartTls`].
pub fn pre_tls_dialogue(protocol: Protocol, settings: &DialogueSettings) -> Box<dyn Dialogue> {
    match protocol {
        Protocol::Imap => Box::new(imap::ImapDialogue::pre_tls(settings)),
        Protocol::Pop3 => Box::new(pop3::Pop3Dialogue::pre_tls(settings)),
        Protocol::Smtp => Box::new(smtp::SmtpDialogue::pre_tls(settings)),
    }
}

/// The one denial text every protocol shows, whatever the reason.
pub const DENIAL_TEXT: &str = "You are not allowed to access this server";
