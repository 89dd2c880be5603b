//! Which login method Postern uses upstream: chosen from what the upstream advertises before
//! login (IMAP `CAPABILITY`, POP3 `CAPA`, SMTP `EHLO`) and the kind of stored credential.
//!
//! - IMAP, a password: `LOGIN` unless `LOGINDISABLED`, else `AUTHENTICATE PLAIN`, else
//!   `AUTHENTICATE LOGIN`.
//! - POP3, a password: `AUTH PLAIN`, else `AUTH LOGIN`, else `USER`/`PASS` (when `CAPA` lists
//!   `USER` or is not supported). SASL LOGIN comes before `USER` because a server that lists
//!   SASL mechanisms without PLAIN may still list `USER` and refuse `PASS` (Dovecot does).
//! - SMTP, a password: `AUTH PLAIN`, else `AUTH LOGIN` (Office 365 offers only `LOGIN XOAUTH2`).
//! - Every protocol, a token: SASL `XOAUTH2`.
//!
//! Nothing here does I/O: the dialogues parse the advertisement into an [`Offer`] and ask
//! [`choose`].

use std::fmt;

use crate::protocol::Protocol;

/// One way of logging in upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// IMAP `LOGIN user password`.
    ImapLogin,
    /// POP3 `USER` then `PASS`.
    UserPass,
    /// SASL PLAIN (RFC 4616).
    Plain,
    /// SASL LOGIN: user name and password in two challenges.
    Login,
    /// SASL XOAUTH2 with a bearer token.
    XOAuth2,
}

impl Method {
    /// The method's name for logs.
    pub fn name(self) -> &'static str {
        match self {
            Method::ImapLogin => "LOGIN command",
            Method::UserPass => "USER/PASS",
            Method::Plain => "SASL PLAIN",
            Method::Login => "SASL LOGIN",
            Method::XOAuth2 => "SASL XOAUTH2",
        }
    }
}

/// What kind of secret the credential is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialKind {
    /// A password or app password.
    Password,
    /// An OAuth2 access token.
    Token,
}

impl fmt::Display for CredentialKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CredentialKind::Password => "a password",
            CredentialKind::Token => "an OAuth2 token",
        })
    }
}

/// What an upstream advertised before login.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Offer {
    /// The SASL mechanisms, upper-case; `None` when the upstream did not say (POP3 without
    /// `CAPA`).
    pub sasl: Option<Vec<String>>,
    /// The protocol's own password command is usable: IMAP `LOGIN` (no `LOGINDISABLED`),
    /// POP3 `USER`. Always false for SMTP.
    pub password_command: bool,
}

impl Offer {
    /// An offer of `sasl` mechanisms (any case) and, or not, the password command.
    pub fn new<'a>(sasl: impl IntoIterator<Item = &'a str>, password_command: bool) -> Self {
        Self { sasl: Some(sasl.into_iter().map(str::to_ascii_uppercase).collect()), password_command }
    }

    fn has(&self, mechanism: &str) -> bool {
        self.sasl.as_ref().is_some_and(|m| m.iter().any(|s| s == mechanism))
    }

    /// The offer as the protocol writes it, for errors: `AUTH LOGIN XOAUTH2`,
    /// `AUTH=LOGIN LOGINDISABLED`, `SASL LOGIN USER`.
    pub fn describe(&self, protocol: Protocol) -> String {
        let sasl = self.sasl.as_deref().unwrap_or_default();
        let mut words: Vec<String> = match protocol {
            Protocol::Imap => sasl.iter().map(|m| format!("AUTH={m}")).collect(),
            Protocol::Pop3 if sasl.is_empty() => Vec::new(),
            Protocol::Pop3 => vec![format!("SASL {}", sasl.join(" "))],
            Protocol::Smtp if sasl.is_empty() => vec!["no AUTH".to_owned()],
            Protocol::Smtp => vec![format!("AUTH {}", sasl.join(" "))],
        };
        match protocol {
            Protocol::Imap if !self.password_command => words.push("LOGINDISABLED".to_owned()),
            Protocol::Pop3 if self.sasl.is_none() => words.push("no CAPA".to_owned()),
            Protocol::Pop3 if self.password_command => words.push("USER".to_owned()),
            _ => {}
        }
        if words.is_empty() {
            return "nothing to log in with".to_owned();
        }
        words.join(" ")
    }
}

/// Nothing the upstream offers fits the credential.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the upstream offers no login method for {credential} (it offers: {offered})")]
pub struct NoMethod {
    /// What the credential is.
    pub credential: CredentialKind,
    /// What the upstream offered, as [`Offer::describe`] writes it.
    pub offered: String,
}

/// The login method for a `credential` given what the `protocol` upstream `offer`s.
pub fn choose(protocol: Protocol, offer: &Offer, credential: CredentialKind) -> Result<Method, NoMethod> {
    let chosen = match (credential, protocol) {
        // A POP3 server without CAPA cannot say; XOAUTH2 is the only thing worth trying.
        (CredentialKind::Token, _) => (offer.has("XOAUTH2") || offer.sasl.is_none()).then_some(Method::XOAuth2),
        (CredentialKind::Password, Protocol::Imap) => {
            if offer.password_command {
                Some(Method::ImapLogin)
            } else {
                sasl_password(offer)
            }
        }
        (CredentialKind::Password, Protocol::Pop3) => {
            sasl_password(offer).or((offer.password_command || offer.sasl.is_none()).then_some(Method::UserPass))
        }
        (CredentialKind::Password, Protocol::Smtp) => sasl_password(offer),
    };
    chosen.ok_or_else(|| NoMethod { credential, offered: offer.describe(protocol) })
}

fn sasl_password(offer: &Offer) -> Option<Method> {
    if offer.has("PLAIN") {
        Some(Method::Plain)
    } else if offer.has("LOGIN") {
        Some(Method::Login)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use CredentialKind::{Password, Token};
    use Method::*;
    use Protocol::{Imap, Pop3, Smtp};

    /// (protocol, SASL offered (None: not told), password command, credential, expected).
    type Row = (Protocol, Option<&'static [&'static str]>, bool, CredentialKind, Result<Method, &'static str>);

    #[test]
    fn the_method_follows_the_offer_and_the_credential() {
        let table: &[Row] = &[
            // IMAP
            (Imap, Some(&["PLAIN", "LOGIN"]), true, Password, Ok(ImapLogin)),
            (Imap, Some(&[]), true, Password, Ok(ImapLogin)),
            (Imap, Some(&["PLAIN", "LOGIN"]), false, Password, Ok(Plain)),
            (Imap, Some(&["login"]), false, Password, Ok(Login)),
            (Imap, Some(&["XOAUTH2"]), false, Password, Err("AUTH=XOAUTH2 LOGINDISABLED")),
            (Imap, Some(&["PLAIN", "XOAUTH2"]), true, Token, Ok(XOAuth2)),
            (Imap, Some(&["PLAIN"]), true, Token, Err("AUTH=PLAIN")),
            // POP3
            (Pop3, Some(&["PLAIN", "LOGIN"]), true, Password, Ok(Plain)),
            (Pop3, Some(&["LOGIN"]), true, Password, Ok(Login)),
            (Pop3, Some(&[]), true, Password, Ok(UserPass)),
            (Pop3, None, true, Password, Ok(UserPass)),
            (Pop3, Some(&["XOAUTH2"]), false, Password, Err("SASL XOAUTH2")),
            (Pop3, Some(&["PLAIN", "XOAUTH2"]), true, Token, Ok(XOAuth2)),
            (Pop3, None, true, Token, Ok(XOAuth2)),
            (Pop3, Some(&["PLAIN"]), true, Token, Err("SASL PLAIN USER")),
            // SMTP (Office 365 offers LOGIN and XOAUTH2 only)
            (Smtp, Some(&["PLAIN", "LOGIN"]), false, Password, Ok(Plain)),
            (Smtp, Some(&["LOGIN", "XOAUTH2"]), false, Password, Ok(Login)),
            (Smtp, Some(&["LOGIN", "XOAUTH2"]), false, Token, Ok(XOAuth2)),
            (Smtp, Some(&["PLAIN", "LOGIN"]), false, Token, Err("AUTH PLAIN LOGIN")),
            (Smtp, Some(&[]), false, Password, Err("no AUTH")),
            (Smtp, Some(&["CRAM-MD5"]), false, Password, Err("AUTH CRAM-MD5")),
        ];
        for (protocol, sasl, password_command, credential, expected) in table {
            let offer = Offer {
                sasl: sasl.map(|s| s.iter().map(|m| m.to_ascii_uppercase()).collect()),
                password_command: *password_command,
            };
            let got = choose(*protocol, &offer, *credential);
            match expected {
                Ok(method) => assert_eq!(got, Ok(*method), "{protocol} {offer:?} {credential}"),
                Err(offered) => {
                    let err = got.expect_err("no method fits");
                    assert_eq!(err.offered, *offered, "{protocol} {offer:?} {credential}");
                    assert_eq!(err.credential, *credential);
                }
            }
        }
    }

    #[test]
    fn the_refusal_names_the_credential_and_the_offer() {
        let err = choose(Smtp, &Offer::new(["PLAIN", "LOGIN"], false), Token).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the upstream offers no login method for an OAuth2 token (it offers: AUTH PLAIN LOGIN)"
        );
        let err = choose(Pop3, &Offer::new([], false), Password).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the upstream offers no login method for a password (it offers: nothing to log in with)"
        );
    }
}
