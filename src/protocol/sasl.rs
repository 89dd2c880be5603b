//! SASL mechanisms: decoding what clients send (PLAIN, LOGIN) and encoding what Postern
//! sends upstream (PLAIN, XOAUTH2).
//!
//! [`SaslExchange`] runs the client side of a PLAIN or LOGIN exchange independently of
//! the protocol; each dialogue only wraps its challenges and maps its outcomes to the
//! protocol's reply syntax.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use zeroize::Zeroizing;

use super::{CredentialFault, fields};
use crate::secret::Secret;

/// Why a SASL response could not be decoded or used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SaslError {
    /// The response is not valid base64.
    #[error("invalid base64 in SASL response")]
    InvalidBase64,
    /// The decoded response does not have the mechanism's shape.
    #[error("malformed SASL response")]
    Malformed,
}

/// A decoded SASL PLAIN response (RFC 4616).
#[derive(Debug)]
pub struct PlainResponse {
    /// Authorization identity; empty when the client did not give one.
    pub authzid: String,
    /// Authentication identity: the user name.
    pub authcid: String,
    /// The password.
    pub password: Secret,
}

/// Decodes base64 after trimming surrounding whitespace; the result is wiped on drop.
fn decode_base64(b64: &[u8]) -> Result<Zeroizing<Vec<u8>>, SaslError> {
    STANDARD.decode(b64.trim_ascii()).map(Zeroizing::new).map_err(|_| SaslError::InvalidBase64)
}

/// UTF-8 text of one decoded field, which must not hold NUL, CR or LF.
fn text_field(raw: &[u8]) -> Result<&str, SaslError> {
    if raw.iter().any(|b| matches!(b, b'\0' | b'\r' | b'\n')) {
        return Err(SaslError::Malformed);
    }
    std::str::from_utf8(raw).map_err(|_| SaslError::Malformed)
}

/// Decodes a base64 SASL PLAIN response: `authzid NUL authcid NUL password`.
///
/// Every field must be UTF-8 without CR or LF, and the authcid must not be empty.
pub fn decode_plain(b64: &[u8]) -> Result<PlainResponse, SaslError> {
    let raw = decode_base64(b64)?;
    let mut fields = raw.split(|&b| b == 0);
    let (Some(authzid), Some(authcid), Some(password), None) =
        (fields.next(), fields.next(), fields.next(), fields.next())
    else {
        return Err(SaslError::Malformed);
    };
    let authcid = text_field(authcid)?;
    if authcid.is_empty() {
        return Err(SaslError::Malformed);
    }
    Ok(PlainResponse {
        authzid: text_field(authzid)?.to_owned(),
        authcid: authcid.to_owned(),
        password: Secret::new(text_field(password)?),
    })
}

/// Decodes one base64 line of SASL LOGIN (user name or password) into UTF-8 text
/// without NUL, CR or LF.
pub fn decode_login_field(b64: &[u8]) -> Result<Secret, SaslError> {
    let raw = decode_base64(b64)?;
    Ok(Secret::new(text_field(&raw)?))
}

/// Base64 SASL PLAIN initial response for `user` and `password`, no authzid.
pub fn encode_plain(user: &str, password: &str) -> String {
    let mut raw = Zeroizing::new(Vec::with_capacity(user.len() + password.len() + 2));
    raw.push(0);
    raw.extend_from_slice(user.as_bytes());
    raw.push(0);
    raw.extend_from_slice(password.as_bytes());
    STANDARD.encode(&*raw)
}

/// Base64 SASL XOAUTH2 initial response for `user` and bearer `token`.
pub fn encode_xoauth2(user: &str, token: &str) -> String {
    let raw = Zeroizing::new(format!("user={user}\x01auth=Bearer {token}\x01\x01"));
    STANDARD.encode(raw.as_bytes())
}

/// The SASL mechanisms clients may use to log in to Postern.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    /// RFC 4616 PLAIN.
    Plain,
    /// The de-facto LOGIN mechanism: user name and password in two challenges.
    Login,
}

impl Mechanism {
    /// Recognises a mechanism name, case-insensitively.
    pub fn parse(name: &[u8]) -> Option<Self> {
        if name.eq_ignore_ascii_case(b"PLAIN") {
            Some(Mechanism::Plain)
        } else if name.eq_ignore_ascii_case(b"LOGIN") {
            Some(Mechanism::Login)
        } else {
            None
        }
    }
}

/// Base64 of "Username:", LOGIN's first challenge.
const USERNAME_CHALLENGE: &str = "VXNlcm5hbWU6";
/// Base64 of "Password:", LOGIN's second challenge.
const PASSWORD_CHALLENGE: &str = "UGFzc3dvcmQ6";

/// What the dialogue must do after starting or advancing a [`SaslExchange`].
#[derive(Debug)]
pub enum SaslStep {
    /// Send this base64 challenge (possibly empty) in the protocol's continuation
    /// syntax and feed the client's next line to [`SaslExchange::respond`].
    Challenge(&'static str),
    /// The exchange produced a checked, trimmed user name and a password.
    Done {
        /// The user name, trimmed, UTF-8, free of control characters.
        user: String,
        /// The password: non-empty UTF-8 without NUL, CR or LF.
        password: Secret,
    },
    /// The exchange produced credentials that are refused without asking the directory
    /// (a foreign authorization identity, an empty password, an unusable user name).
    Refused {
        /// The checked, trimmed user name, when it is usable.
        user: Option<String>,
        /// What is wrong.
        fault: CredentialFault,
    },
    /// The client answered `*`.
    Cancelled,
    /// The client's response was unusable; the exchange is over.
    Invalid(SaslError),
}

#[derive(Debug)]
enum Awaiting {
    PlainResponse,
    LoginUser,
    /// The user name, or `None` when it was unusable: the exchange still asks for the
    /// password, so the refusal comes where a wrong password's would.
    LoginPassword(Option<String>),
    Nothing,
}

/// The server side of one PLAIN or LOGIN exchange, fed one client line at a time.
#[derive(Debug)]
pub struct SaslExchange {
    mechanism: Mechanism,
    awaiting: Awaiting,
}

impl SaslExchange {
    /// Starts an exchange. `initial` is the initial response if the client sent one
    /// (`=` meaning an empty one, per RFC 4954 and SASL-IR).
    pub fn start(mechanism: Mechanism, initial: Option<&[u8]>) -> (Self, SaslStep) {
        let awaiting = match mechanism {
            Mechanism::Plain => Awaiting::PlainResponse,
            Mechanism::Login => Awaiting::LoginUser,
        };
        let mut exchange = SaslExchange { mechanism, awaiting };
        let step = match initial {
            Some(b"=") => exchange.respond(b""),
            Some(response) => exchange.respond(response),
            None => SaslStep::Challenge(match mechanism {
                Mechanism::Plain => "",
                Mechanism::Login => USERNAME_CHALLENGE,
            }),
        };
        (exchange, step)
    }

    /// The mechanism being run.
    pub fn mechanism(&self) -> Mechanism {
        self.mechanism
    }

    /// Feeds one client line (terminator stripped).
    pub fn respond(&mut self, line: &[u8]) -> SaslStep {
        if line.trim_ascii() == b"*" {
            self.awaiting = Awaiting::Nothing;
            return SaslStep::Cancelled;
        }
        let step = match std::mem::replace(&mut self.awaiting, Awaiting::Nothing) {
            Awaiting::PlainResponse => plain(line),
            Awaiting::LoginUser => match decode_login_field(line) {
                Ok(user) => {
                    self.awaiting = Awaiting::LoginPassword(fields::user_name(user.expose().as_bytes()));
                    return SaslStep::Challenge(PASSWORD_CHALLENGE);
                }
                Err(e) => Err(e),
            },
            Awaiting::LoginPassword(user) => decode_login_field(line).map(|password| checked(user, password)),
            Awaiting::Nothing => Err(SaslError::Malformed),
        };
        step.unwrap_or_else(SaslStep::Invalid)
    }
}

/// Turns a PLAIN response into credentials, or a refusal for a foreign authorization
/// identity, an unusable user name or an empty password.
fn plain(line: &[u8]) -> Result<SaslStep, SaslError> {
    let response = decode_plain(line)?;
    let user = fields::user_name(response.authcid.as_bytes());
    if let Some(user) = &user {
        let authzid = response.authzid.trim();
        if !authzid.is_empty() && !authzid.eq_ignore_ascii_case(user) {
            return Ok(SaslStep::Refused { user: Some(user.clone()), fault: CredentialFault::AuthzidMismatch });
        }
    }
    Ok(checked(user, response.password))
}

/// Credentials with a decoded user name (`None` when unusable) and password, or their refusal.
fn checked(user: Option<String>, password: Secret) -> SaslStep {
    match user {
        None => SaslStep::Refused { user: None, fault: CredentialFault::InvalidUserName },
        Some(user) if password.is_empty() => {
            SaslStep::Refused { user: Some(user), fault: CredentialFault::EmptyPassword }
        }
        Some(user) => SaslStep::Done { user, password },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(raw: &[u8]) -> Vec<u8> {
        STANDARD.encode(raw).into_bytes()
    }

    fn done(step: SaslStep) -> (String, String) {
        match step {
            SaslStep::Done { user, password } => (user, password.expose().to_owned()),
            other => panic!("expected Done, got {other:?}"),
        }
    }

    fn refused(step: SaslStep) -> (Option<String>, CredentialFault) {
        match step {
            SaslStep::Refused { user, fault } => (user, fault),
            other => panic!("expected Refused, got {other:?}"),
        }
    }

    fn invalid(step: SaslStep) -> SaslError {
        match step {
            SaslStep::Invalid(e) => e,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn plain_round_trip_with_awkward_password() {
        let pw = "pä ss\"w\\rd";
        let encoded = encode_plain("alice@example.com", pw);
        let r = decode_plain(encoded.as_bytes()).unwrap();
        assert_eq!((r.authzid.as_str(), r.authcid.as_str()), ("", "alice@example.com"));
        assert_eq!(r.password.expose(), pw);
        let spaced = format!("  {encoded} \t");
        assert!(decode_plain(spaced.as_bytes()).is_ok());
    }

    #[test]
    fn plain_rejects_bad_shapes() {
        assert_eq!(decode_plain(b"!!!").unwrap_err(), SaslError::InvalidBase64);
        assert_eq!(decode_plain(b"YWJj").unwrap_err(), SaslError::Malformed);
    }

    #[test]
    fn xoauth2_layout() {
        let raw = STANDARD.decode(encode_xoauth2("a@b", "tok")).unwrap();
        assert_eq!(raw, b"user=a@b\x01auth=Bearer tok\x01\x01");
    }

    #[test]
    fn plain_exchange_with_and_without_initial_response() {
        let ir = b64(b"\0alice\0secret");
        let (_, step) = SaslExchange::start(Mechanism::Plain, Some(&ir));
        assert_eq!(done(step), ("alice".into(), "secret".into()));

        let (mut ex, step) = SaslExchange::start(Mechanism::Plain, None);
        assert!(matches!(step, SaslStep::Challenge("")));
        assert_eq!(done(ex.respond(&b64(b"alice\0alice\0secret"))), ("alice".into(), "secret".into()));

        let (_, step) = SaslExchange::start(Mechanism::Plain, Some(b"="));
        assert_eq!(invalid(step), SaslError::Malformed);
    }

    #[test]
    fn plain_exchange_refusals() {
        let cases: &[(&[u8], SaslError)] = &[
            (b"\0\0pw", SaslError::Malformed),
            (b"\0al\rice\0pw", SaslError::Malformed),
            (b"\0alice\0p\nw", SaslError::Malformed),
            (b"\0al\xffice\0pw", SaslError::Malformed),
            (b"\0alice\0pw\0", SaslError::Malformed),
        ];
        for (raw, err) in cases {
            let (_, step) = SaslExchange::start(Mechanism::Plain, Some(&b64(raw)));
            assert_eq!(&invalid(step), err, "{raw:?}");
        }
        // Well-formed but unusable credentials are refusals, for the session to count.
        let alice = || Some("alice".to_owned());
        let refusals: &[(&[u8], Option<String>, CredentialFault)] = &[
            (b"bob\0alice\0pw", alice(), CredentialFault::AuthzidMismatch),
            (b" Bob \0 alice \0pw", alice(), CredentialFault::AuthzidMismatch),
            (b"bob\0alice\0", alice(), CredentialFault::AuthzidMismatch),
            (b"\0alice\0", alice(), CredentialFault::EmptyPassword),
            (b"ALICE\0alice\0", alice(), CredentialFault::EmptyPassword),
            (b"\0 \0pw", None, CredentialFault::InvalidUserName),
            (b"bob\0a\x1bb\0pw", None, CredentialFault::InvalidUserName),
        ];
        for (raw, user, fault) in refusals {
            let (_, step) = SaslExchange::start(Mechanism::Plain, Some(&b64(raw)));
            assert_eq!(refused(step), (user.clone(), *fault), "{raw:?}");
        }
        let (_, step) = SaslExchange::start(Mechanism::Plain, Some(b"%%%"));
        assert_eq!(invalid(step), SaslError::InvalidBase64);
    }

    #[test]
    fn login_exchange() {
        let (mut ex, step) = SaslExchange::start(Mechanism::Login, None);
        assert!(matches!(step, SaslStep::Challenge(USERNAME_CHALLENGE)));
        assert!(matches!(ex.respond(&b64(b" alice ")), SaslStep::Challenge(PASSWORD_CHALLENGE)));
        assert_eq!(done(ex.respond(&b64("pä ss".as_bytes()))), ("alice".into(), "pä ss".into()));

        let (mut ex, step) = SaslExchange::start(Mechanism::Login, Some(&b64(b"alice")));
        assert!(matches!(step, SaslStep::Challenge(PASSWORD_CHALLENGE)));
        assert!(matches!(ex.respond(b" * "), SaslStep::Cancelled));

        let (mut ex, _) = SaslExchange::start(Mechanism::Login, None);
        assert_eq!(invalid(ex.respond(&b64(b"al\0ice"))), SaslError::Malformed);
        let (mut ex, _) = SaslExchange::start(Mechanism::Login, None);
        ex.respond(&b64(b"alice"));
        assert_eq!(refused(ex.respond(b"")), (Some("alice".into()), CredentialFault::EmptyPassword));
        assert_eq!(invalid(ex.respond(&b64(b"late"))), SaslError::Malformed);
        // An unusable user name is refused after the password, where a wrong one would be.
        let (mut ex, _) = SaslExchange::start(Mechanism::Login, None);
        assert!(matches!(ex.respond(&b64(b" \x1b ")), SaslStep::Challenge(PASSWORD_CHALLENGE)));
        assert_eq!(refused(ex.respond(&b64(b"pw"))), (None, CredentialFault::InvalidUserName));
    }
}
